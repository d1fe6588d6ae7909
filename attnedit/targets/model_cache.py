"""The edited model's cache and the bookkeeping of each forward call over it.

:class:`AttnEditCache` holds one cache layer per model layer (``caches.py``: full K/V, sliding ring buffers; MLA's
latent; a split layer's two parts) and what the layers share: the token count, each row's count of real tokens,
which columns hold padding. :meth:`AttnEditCache.begin` turns a call's attention mask and positions into the
:class:`~.common.AttentionContext` every attention reads, :meth:`AttnEditCache.end` records the call's tokens.
:meth:`AttnEditCache.rows` gives a view over some rows of a static cache (a chunked prefill writes one group of
sequences at a time); :func:`chunk_mask` is the attention mask of one such chunk, and :func:`context_without_cache`
the context of a call without a cache (training, a bare forward).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .common import AttentionContext, static_buffer


class AttnEditCache(Cache):
    """One attnedit cache layer per model layer (full K/V, latent, or sliding ring buffer).

    Growing (default for a bare forward call): tensors grow as tokens arrive. Static
    (``static=True``, what ``generate()`` uses): every tensor is allocated once for ``batch_size`` x
    ``max_length`` and written in place; the token count (``n_cached_device``; ``n_cached`` counts on the host for a growing cache), each row's count of real tokens
    (``real``) and which columns hold padding (``valid``, only read once padding was seen) are device
    tensors, so a one-token step runs without reading anything on the host: it compiles into one
    graph (``torch.compile``, CUDA graphs), which is how ``generate()`` runs it on a GPU.
    """

    def __init__(self, layers: list, static: bool = False, batch_size: int = 0, max_length: int = 0, device=None):
        super().__init__(layers=layers)
        self.static = static
        self.n_cached = 0
        self.n_rows, self.max_length = batch_size, max_length
        if static:
            self.n_cached_device = static_buffer((), torch.long, device)
            self.real = static_buffer((batch_size,), torch.long, device)
            self.valid = static_buffer((batch_size, max_length), torch.bool, device)
            self.valid.fill_(True)
            self.padded = False  # set (on the host) by a prefill that contains padding

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.static:
            return int(self.n_cached_device)  # reads the device count (eager code only; decoding never calls it)
        return self.n_cached

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_length if self.static else -1

    @property
    def is_compileable(self) -> bool:
        return self.static

    @property
    def is_croppable(self) -> bool:
        return False

    def allocated_bytes(self) -> int:
        """Bytes of storage the K/V (or latent) tensors hold, summed over layers."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def rows(self, start: int, end: int) -> AttnEditCache:
        """A static cache over rows ``start:end`` of this one: every tensor a view of this cache's (writes land
        here), with its own token count starting at this cache's (a prefill of one group of sequences)."""
        if not self.static:
            raise ValueError("only a static cache has row views")
        view = AttnEditCache([layer.rows(start, end) for layer in self.layers])
        view.static, view.n_rows, view.max_length = True, end - start, self.max_length
        view.n_cached, view.padded = self.n_cached, self.padded
        view.n_cached_device = self.n_cached_device.clone()
        view.real, view.valid = self.real[start:end], self.valid[start:end]
        return view

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self.layers:
            layer.reorder_cache(beam_idx)
        if self.static:
            self.real.copy_(self.real.index_select(0, beam_idx.to(self.real.device)))
            self.valid.copy_(self.valid.index_select(0, beam_idx.to(self.valid.device)))

    def batch_repeat_interleave(self, repeats: int):
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor):
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def reset(self):
        for layer in self.layers:
            layer.reset()
        self.n_cached = 0
        if self.static:
            self.n_cached_device.zero_()
            self.real.zero_()
            self.valid.fill_(True)
            self.padded = False

    def crop(self, max_length: int):
        raise NotImplementedError("attnedit caches cannot be cropped (assisted decoding is not supported)")

    # ------------------------------------------------------------------ per-call bookkeeping

    def begin(self, b: int, t: int, attention_mask, position_ids, device) -> AttentionContext:
        """The context of a forward call over ``t`` new tokens; :meth:`end` records them."""
        if self.static and t == 1:
            return self._begin_decode(b, attention_mask, position_ids)
        n_cached = self.get_seq_length()
        if self.static and n_cached + t > self.max_length:
            raise ValueError(
                f"this static cache holds {self.max_length} tokens; {n_cached} are in it and {t} more do not fit "
                "(allocate a larger one: model.new_cache(static=True, batch_size=..., max_length=...))"
            )
        if not self.static and attention_mask is not None and attention_mask.shape[-1] != n_cached + t:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens; expected cached + new = {n_cached + t}")
        new_mask = new_token_mask(attention_mask, n_cached, t)
        if self.static:
            if new_mask is not None:
                self.padded = True
            if self.padded:
                self.valid[:, n_cached : n_cached + t] = True if new_mask is None else new_mask
            key_padding = self.valid[:, : n_cached + t] if self.padded else None
            real_before = self.real
        else:
            key_padding = None
            if attention_mask is not None and new_mask is not None:
                key_padding = attention_mask.bool()
            real_before = None
        if position_ids is None:
            if key_padding is None:
                position_ids = torch.arange(n_cached, n_cached + t, device=device)[None].expand(b, t)
            elif real_before is not None:
                counts = (new_mask if new_mask is not None else torch.ones(b, t, dtype=torch.bool, device=device)).long()
                position_ids = (real_before[:, None] + counts.cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
        elif position_ids.shape[-1] != t:
            position_ids = position_ids[..., -t:]
        return AttentionContext(position_ids, n_cached, t, key_padding, self, new_mask=new_mask)

    def _begin_decode(self, b: int, attention_mask, position_ids) -> AttentionContext:
        n = self.n_cached_device
        if position_ids is None:
            position_ids = self.real[:, None]
        elif position_ids.shape[-1] != 1:
            position_ids = position_ids[..., -1:]
        key_valid = new_mask = None
        if self.padded:
            if attention_mask is not None:
                new_mask = attention_mask[:, -1:].bool()
            self.valid.index_copy_(1, n.view(1), new_mask if new_mask is not None else torch.ones(b, 1, dtype=torch.bool, device=n.device))
            key_valid = self.valid
        return AttentionContext(position_ids, None, 1, None, self, n_written=n, n_filled=n + 1, key_valid=key_valid, new_mask=new_mask)

    def end(self, ctx: AttentionContext) -> None:
        if not self.static:
            self.n_cached = ctx.n_cached + ctx.q_len
            return
        self.real.add_(ctx.q_len if ctx.new_mask is None else ctx.new_mask.long().sum(-1))
        self.n_cached_device.add_(ctx.q_len)


def new_token_mask(attention_mask, n_cached: int, t: int) -> torch.Tensor | None:
    """The new tokens' part of a 2-D attention mask as bool, or None when it has no padding."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError("attnedit models take a 2-D attention_mask [batch, tokens] (1 = real token)")
    if attention_mask.shape[1] not in (n_cached + t, t):
        raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens; expected cached + new = {n_cached + t}")
    new = attention_mask[:, -t:].bool()
    if bool(new.all()) and bool(attention_mask.all()):
        return None
    return new


def chunk_mask(attention_mask, i: int, j: int, n_before: int, s: int, e: int, t: int, static: bool):
    """The 2-D attention mask of rows ``i:j`` for the chunk of new tokens ``s:e`` (of ``t``) after ``n_before``
    cached ones: a static cache takes the new tokens' columns, a growing one every column up to the chunk's end."""
    if attention_mask is None:
        return None
    offset = attention_mask.shape[1] - t  # the mask covers the cached tokens too, or only the new ones
    if static:
        return attention_mask[i:j, offset + s : offset + e]
    return attention_mask[i:j, : offset + e]


def context_without_cache(b: int, t: int, attention_mask, position_ids, device) -> AttentionContext:
    key_padding = new_token_mask(attention_mask, 0, t)
    if position_ids is None:
        if key_padding is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            position_ids = torch.arange(t, device=device)[None].expand(b, t)
    return AttentionContext(position_ids, 0, t, key_padding, None)
