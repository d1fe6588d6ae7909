"""The cache layers the attentions share: the full K/V cache and the sliding window's ring buffer.

Each is one layer's slot of the model's cache (:class:`~.model_cache.AttnEditCache`), growing (tensors
concatenated as tokens arrive) or static (allocated once for batch x length and written in place, which is
what a compiled decode step needs):

* :class:`KVCacheLayer` / :class:`StaticKVCacheLayer`: K and V of every token (the teacher's attention, GateSWA's
  full layers, GQA, and the full KV heads of a split layer);
* :class:`SlidingKVCacheLayer` / :class:`StaticSlidingKVCacheLayer`: a ring buffer of at most ``window + sink``
  tokens (sliding layers, whatever their attention; MLA's windowed latent caches derive from them).

A sliding layer's cache holds at most ``window + sink`` tokens whatever the sequence length. Sink tokens are the
first ``sink`` token *indices*: in a left-padded batch, a padded row's sink slots hold padding (masked), so that
row runs without sinks. Serving engines do not pad.
"""

from __future__ import annotations

import torch

from .common import AttentionContext, CacheLayer, static_buffer


class KVCacheLayer(CacheLayer):
    """Growing full cache: K and V of every token, ``[batch, kv_heads, tokens, head_dim]`` each."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.n_cached = 0

    def tensors(self):
        return [t for t in (self.k, self.v) if t is not None]

    def update(self, k, v, ctx: AttentionContext):
        """Append; returns (keys, values, key_index), key_index None when the keys are just the new tokens."""
        first = self.k is None
        if first:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        self.n_cached += k.shape[2]
        if first:
            return self.k, self.v, None
        return self.k, self.v, torch.arange(self.n_cached, device=k.device)


class StaticKVCacheLayer(CacheLayer):
    """Static full cache: ``[batch, kv_heads, max_length, head_dim]`` K and V allocated once; token ``p``
    is written in place at column ``p``."""

    static = True
    is_compileable = True

    def __init__(self, batch: int, kv_heads: int, max_length: int, head_dim: int, v_dim: int, dtype, device):
        self.k = static_buffer((batch, kv_heads, max_length, head_dim), dtype, device)
        self.v = static_buffer((batch, kv_heads, max_length, v_dim), dtype, device)

    def tensors(self):
        return [self.k, self.v]

    def update(self, k, v, ctx: AttentionContext):
        """Eager write of a chunk at its columns; returns what a chunk's attention reads."""
        n_cached, t = ctx.n_cached, k.shape[2]
        self.k[:, :, n_cached : n_cached + t] = k
        self.v[:, :, n_cached : n_cached + t] = v
        if n_cached == 0:
            return k, v, None
        return self.k[:, :, : n_cached + t], self.v[:, :, : n_cached + t], torch.arange(n_cached + t, device=k.device)

    def decode_update(self, k, v, ctx: AttentionContext):
        """Write one token at column ``n_written`` (a device tensor); returns the decode kernel's inputs."""
        self.k.index_copy_(2, ctx.n_written.view(1), k)
        self.v.index_copy_(2, ctx.n_written.view(1), v)
        return self.k, self.v, ctx.n_filled, ctx.key_valid


def ring_slot(p, sink: int, window: int):
    """Slot of token ``p`` (int or tensor): sinks stay in slots ``0..sink-1``, the rest rotate."""
    if isinstance(p, torch.Tensor):
        return torch.where(p < sink, p, sink + (p - sink).remainder(window))
    return p if p < sink else sink + (p - sink) % window


def ring_positions(n, sink: int, window: int, device) -> torch.Tensor:
    """Absolute index of the token held by each of the ``sink + window`` slots after ``n`` tokens (``n``
    an int or a device tensor); slots not written yet get index 0 (callers mask them by count)."""
    slots = torch.arange(sink + window, device=device)
    r = slots - sink
    latest = sink + r + window * torch.div(n - 1 - sink - r, window, rounding_mode="floor")
    return torch.where(slots < sink, slots, latest).clamp(min=0)


def kept_tokens(start: int, end: int, sink: int, window: int) -> list[int]:
    """Tokens of ``start..end-1`` a ring still holds once ``end`` tokens have been seen: the sinks among them,
    then the last ``window`` (at most ``sink + window`` numbers, whatever the chunk's length)."""
    return [*range(start, min(end, sink)), *range(max(start, sink, end - window), end)]


def kept_index(start: int, end: int, sink: int, window: int, device) -> torch.Tensor:
    """:func:`kept_tokens` as a device tensor, built on the device (no host list, no host-to-device copy)."""
    head_end, tail_start = max(start, min(end, sink)), max(start, sink, end - window)
    head = torch.arange(start, head_end, device=device)
    return torch.cat([head, torch.arange(min(tail_start, end), end, device=device)])


class SlidingKVCacheLayer(CacheLayer):
    """Growing ring buffer of at most ``window + sink`` tokens, ``[batch, kv_heads, slots, head_dim]``.

    Slots ``0..sink-1`` hold the first tokens for good; token ``p >= sink`` lives in slot
    ``sink + (p - sink) % window``. Keys carry their RoPE already, so slot order does not matter
    to attention; the absolute index of each slot is derived from the token count alone.
    """

    is_sliding = True

    def __init__(self, window: int, sink: int = 0):
        self.window = window
        self.sink = sink
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.n_cached = 0

    @property
    def capacity(self) -> int:
        return self.window + self.sink

    def tensors(self):
        return [t for t in (self.k, self.v) if t is not None]

    def slot_positions(self, n: int, device) -> torch.Tensor:
        """Absolute index of the token in each filled slot after ``n`` tokens, in slot order."""
        return ring_positions(n, self.sink, self.window, device)[: min(n, self.capacity)]

    def slot_of(self, p: int) -> int:
        return ring_slot(p, self.sink, self.window)

    def update(self, k, v, ctx: AttentionContext):
        n, t = self.n_cached, k.shape[2]
        total = n + t
        if n == 0:  # the keys are this chunk's tokens: keep what the ring holds after it
            keep = kept_tokens(0, t, self.sink, self.window)
            order = sorted(keep, key=self.slot_of)
            idx = torch.tensor(order, device=k.device)
            self.k, self.v = k[:, :, idx], v[:, :, idx]
            self.n_cached = total
            return k, v, None
        if t == 1 and n >= self.capacity:  # overwrite the oldest token in place
            slot = self.slot_of(n)
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            self.n_cached = total
            return self.k, self.v, self.slot_positions(total, k.device)
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        key_index = torch.cat([self.slot_positions(n, k.device), torch.arange(n, total, device=k.device)])
        column = torch.full((total,), -1, dtype=torch.long, device=k.device)
        column[key_index] = torch.arange(key_index.shape[0], device=k.device)
        keep = column[self.slot_positions(total, k.device)]
        self.k, self.v = keys[:, :, keep], values[:, :, keep]
        self.n_cached = total
        return keys, values, key_index


class StaticSlidingKVCacheLayer(CacheLayer):
    """Static ring buffer: ``[batch, kv_heads, window + sink, head_dim]`` allocated once, token ``p``
    written in place at slot ``ring_slot(p)``. The token count lives in the parent cache."""

    static = True
    is_compileable = True
    is_sliding = True

    def __init__(self, window: int, sink: int, batch: int, kv_heads: int, head_dim: int, dtype, device):
        self.window, self.sink = window, sink
        self.k = static_buffer((batch, kv_heads, window + sink, head_dim), dtype, device)
        self.v = static_buffer((batch, kv_heads, window + sink, head_dim), dtype, device)

    @property
    def capacity(self) -> int:
        return self.window + self.sink

    def tensors(self):
        return [self.k, self.v]

    def _write(self, k, v, start: int, end: int) -> None:
        keep = kept_index(start, end, self.sink, self.window, k.device)
        if keep.numel():
            slots = ring_slot(keep, self.sink, self.window)
            self.k.index_copy_(2, slots, k[:, :, keep - start])
            self.v.index_copy_(2, slots, v[:, :, keep - start])

    def update(self, k, v, ctx: AttentionContext):
        n_cached, t = ctx.n_cached, k.shape[2]
        if n_cached == 0:
            self._write(k, v, 0, t)
            return k, v, None
        filled = min(n_cached, self.capacity)
        keys = torch.cat([self.k[:, :, :filled], k], dim=2)
        values = torch.cat([self.v[:, :, :filled], v], dim=2)
        key_index = torch.cat([ring_positions(n_cached, self.sink, self.window, k.device)[:filled], torch.arange(n_cached, n_cached + t, device=k.device)])
        self._write(k, v, n_cached, n_cached + t)
        return keys, values, key_index

    def decode_update(self, k, v, ctx: AttentionContext):
        n = ctx.n_written
        slot = ring_slot(n, self.sink, self.window).view(1)
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        n_filled = ctx.memo(("ring-filled", self.capacity), lambda: torch.clamp(ctx.n_filled, max=self.capacity))
        valid = None
        if ctx.key_valid is not None:

            def slot_valid():
                pos = ring_positions(ctx.n_filled, self.sink, self.window, k.device)
                return ctx.key_valid.gather(1, pos[None].expand(ctx.key_valid.shape[0], -1))

            valid = ctx.memo(("ring-valid", self.sink, self.window), slot_valid)
        return self.k, self.v, n_filled, valid
