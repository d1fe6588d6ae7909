"""GateSWA: gated hybrid sliding-window attention, and its ring-buffer cache.

Each edited layer is either ``sliding`` (sees the last ``window`` tokens, itself included, plus the
first ``sink`` tokens) or ``full``. The attention output passes a learned sigmoid gate before
``o_proj`` (gated attention, as in Qwen3-Next): ``o_proj(sigmoid(g_proj(x)) * attn)``, per element
(``elementwise``) or per head (``headwise``). Heads, QK-norm and biases follow the teacher, so the
weights can start from the teacher's.

A sliding layer's cache holds at most ``window + sink`` tokens whatever the sequence length.
Sink tokens are the first ``sink`` token *indices*: in a left-padded batch, a padded row's sink slots
hold padding (masked), so that row runs without sinks. Serving engines do not pad. The default is sink=4.

A sliding layer may keep some of its KV heads full (``full_kv_heads``): see ``split_heads.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .common import AttentionContext, CacheLayer, static_buffer
from .dense import DenseAttention
from .split_heads import set_full_kv_heads


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
        key_index = torch.cat(
            [ring_positions(n_cached, self.sink, self.window, k.device)[:filled], torch.arange(n_cached, n_cached + t, device=k.device)]
        )
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


class GateSWAAttention(DenseAttention):
    """Teacher-shaped attention with a window (or none, for ``full`` layers) and an output gate."""

    kind = "gateswa"

    def __init__(
        self,
        spec: dict,
        base_config: dict,
        layer_idx: int,
        layer_type: str,
        window: int,
        sink: int = 0,
        gate: str = "elementwise",
        gate_bias: float = 4.0,
        full_kv_heads: list[int] | None = None,
    ):
        if layer_type not in ("sliding", "full"):
            raise ValueError(f"layer_type must be 'sliding' or 'full', got {layer_type!r}")
        super().__init__(spec, base_config, layer_idx, window if layer_type == "sliding" else None, sink)
        self.layer_type = layer_type
        if layer_type == "sliding":  # KV heads kept full inside a sliding layer (split_heads.py)
            set_full_kv_heads(self, full_kv_heads)
        self.gate_kind = gate
        if gate == "none":  # no gate parameters at all: the layer's weights are the stock architecture's
            self.g_proj = None
            return
        width = self.num_heads * self.head_dim if gate == "elementwise" else self.num_heads
        self.g_proj = nn.Linear(self.hidden_size, width, bias=True)
        with torch.no_grad():
            self.g_proj.weight.zero_()
            self.g_proj.bias.fill_(gate_bias)

    def input_linears(self) -> list[nn.Linear]:
        return super().input_linears() + ([self.g_proj] if self.g_proj is not None else [])

    def gate(self, out: torch.Tensor, x: torch.Tensor, pre: torch.Tensor | None = None) -> torch.Tensor:
        if self.g_proj is None:
            return out
        g = torch.sigmoid(pre if pre is not None else self.g_proj(x))
        b, t = x.shape[:2]
        g = g.view(b, t, self.num_heads, -1)
        return out * g.to(out.dtype)
