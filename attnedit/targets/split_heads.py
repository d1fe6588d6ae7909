"""Per-KV-head hybrid attention: in one sliding layer, some KV heads see every earlier token, the rest the window.

A GateSWA layer with ``layer_type: sliding`` and ``full_kv_heads: [j, ...]`` keeps KV heads ``j, ...`` (and the
query heads that read them: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``, as in
grouped-query attention) full, and restricts the others to ``window`` tokens plus ``sink`` first tokens. Each
group is one grouped-query attention of its own, run by the kernels every layer uses (flash causal attention
for the full group; the sliding-window kernel, FlexAttention on CUDA, for the windowed group), and has a cache
of its own: the full heads' K/V grow with the sequence (or are allocated once for the maximum length), the
windowed heads' K/V live in a ring buffer of ``window + sink`` slots. A decode step reads each cache once. So a
layer with ``f`` of its ``n`` KV heads full caches ``2 * head_dim * (f + (n - f) * min(window + sink, L) / L)``
values per token at context ``L`` (``attnedit.eval.kv``).

No stock engine format holds a window per head: such a model exports with remote code only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .caches import KVCacheLayer, SlidingKVCacheLayer, StaticKVCacheLayer, StaticSlidingKVCacheLayer
from .common import AttentionContext, CacheLayer, attend_cached, attend_new, decode


def cached_values(kv_heads: int, head_dim: int, window: int | None, sink: int, context: int, full_kv_heads: int = 0) -> float:
    """Values per token a layer's K/V cache holds at ``context`` tokens: ``2 * head_dim`` per KV head, for every
    token in ``full_kv_heads`` of them (all with no ``window``), for ``min(window + sink, context)`` of the
    ``context`` tokens in the others (``attnedit.eval.kv`` sums them over the layers)."""
    if window is None:
        return 2.0 * kv_heads * head_dim
    return 2.0 * head_dim * (full_kv_heads + (kv_heads - full_kv_heads) * min(window + sink, context) / context)


def _index(heads: tuple[int, ...]) -> slice | list[int]:
    """Heads as an index of dimension 1: a slice (a view) when they are consecutive, else a list."""
    if heads and list(heads) == list(range(heads[0], heads[-1] + 1)):
        return slice(heads[0], heads[-1] + 1)
    return list(heads)


@dataclass(frozen=True)
class HeadSplit:
    """Which KV heads (and query heads) are full and which windowed, as indices of the head dimension."""

    full: tuple[int, ...]
    windowed: tuple[int, ...]
    group: int  # query heads per KV head

    @classmethod
    def make(cls, full_kv_heads, num_heads: int, num_kv_heads: int) -> HeadSplit:
        full = tuple(sorted({int(h) for h in full_kv_heads}))
        if not full or full[0] < 0 or full[-1] >= num_kv_heads or len(full) == num_kv_heads:
            raise ValueError(
                f"full_kv_heads={list(full_kv_heads)}: give some but not all of the KV heads 0-{num_kv_heads - 1} "
                "(none full: a sliding layer; all full: a full layer)"
            )
        return cls(full, tuple(h for h in range(num_kv_heads) if h not in full), num_heads // num_kv_heads)

    def kv(self, which: int):
        return _index(self.full if which == 0 else self.windowed)

    def q(self, which: int):
        heads = self.full if which == 0 else self.windowed
        return _index(tuple(h * self.group + g for h in heads for g in range(self.group)))

    @property
    def restore(self) -> list[int] | None:
        """Query-head order that puts ``cat([full group, windowed group])`` back in head order; None when it is."""
        order = [h * self.group + g for part in (self.full, self.windowed) for h in part for g in range(self.group)]
        if order == sorted(order):
            return None
        back = [0] * len(order)
        for i, h in enumerate(order):
            back[h] = i
        return back


def set_full_kv_heads(attn, full_kv_heads) -> None:
    """Keep ``full_kv_heads`` of ``attn`` (a :class:`DenseAttention` with a window) full; empty or None: none."""
    attn.head_split = HeadSplit.make(full_kv_heads, attn.num_heads, attn.num_kv_heads) if full_kv_heads else None


class SplitHeadsCacheLayer(CacheLayer):
    """One layer's cache as two: ``parts[0]`` holds the full KV heads (every token), ``parts[1]`` the windowed
    ones (a ring buffer), each ``[batch, its KV heads, slots, head_dim]``."""

    def __init__(self, full: CacheLayer, windowed: CacheLayer):
        self.parts = (full, windowed)
        self.static = full.static
        self.is_compileable = full.is_compileable

    def tensors(self):
        return self.parts[0].tensors() + self.parts[1].tensors()

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for part in self.parts:
            part.reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for part in self.parts:
            part.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for part in self.parts:
            part.batch_repeat_interleave(repeats)

    def reset(self) -> None:
        for part in self.parts:
            part.reset()

    def rows(self, start: int, end: int) -> SplitHeadsCacheLayer:
        """This static layer over batch rows ``start:end`` (views: writes land in this layer's storage)."""
        return SplitHeadsCacheLayer(self.parts[0].rows(start, end), self.parts[1].rows(start, end))


def split_cache(attn, static: bool, batch: int, max_length: int, dtype, device) -> SplitHeadsCacheLayer:
    """The two caches of a split layer, each sized for its own heads."""
    split, d = attn.head_split, attn.head_dim
    if static:
        full = StaticKVCacheLayer(batch, len(split.full), max_length, d, d, dtype, device)
        windowed = StaticSlidingKVCacheLayer(attn.window, attn.sink, batch, len(split.windowed), d, dtype, device)
        return SplitHeadsCacheLayer(full, windowed)
    return SplitHeadsCacheLayer(KVCacheLayer(), SlidingKVCacheLayer(attn.window, attn.sink))


def split_attention(attn, q, k, v, ctx: AttentionContext, scale: float, softcap: float | None = None) -> torch.Tensor:
    """:meth:`DenseAttention.attention` for a split layer: ``q`` [B, H, T, D], ``k``/``v`` [B, Hkv, T, D] -> [B, H, T, D],
    the full group attending to every earlier token, the windowed group to its window, each through its own cache
    (scores soft-capped at ``softcap`` where the teacher caps them, as Gemma 2 does)."""
    split = attn.head_split
    layer = ctx.cache.layers[attn.layer_idx] if ctx.cache is not None else None
    outs = []
    for which, window, sink in ((0, None, 0), (1, attn.window, attn.sink)):
        qg, kg, vg = q[:, split.q(which)], k[:, split.kv(which)], v[:, split.kv(which)]
        if layer is None:
            outs.append(attend_new(qg, kg, vg, ctx, window, sink, scale, softcap))
            continue
        part = layer.parts[which]
        if which == 0 and not part.static and ctx.n_cached == 0:  # a growing cache keeps these K/V as they are:
            kg, vg = kg.clone(), vg.clone()  # their own storage, not a view that holds every head's
        if ctx.decoding:
            keys, values, n_filled, valid = part.decode_update(kg, vg, ctx)
            outs.append(decode(qg[:, :, 0], keys, values, n_filled, valid, scale, softcap=softcap)[:, :, None])
            continue
        keys, values, key_index = part.update(kg, vg, ctx)
        if key_index is None:
            outs.append(attend_new(qg, keys, values, ctx, window, sink, scale, softcap))
        else:
            outs.append(attend_cached(qg, keys, values, key_index, ctx, window, sink, scale, softcap))
    out = torch.cat(outs, dim=1)
    restore = split.restore
    return out if restore is None else out[:, restore]
