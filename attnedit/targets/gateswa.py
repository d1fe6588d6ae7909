"""GateSWA: gated hybrid sliding-window attention, and its ring-buffer cache.

Each edited layer is either ``sliding`` (sees the last ``window`` tokens, itself included, plus the
first ``sink`` tokens) or ``full``. The attention output passes a learned sigmoid gate before
``o_proj`` (gated attention, as in Qwen3-Next): ``o_proj(sigmoid(g_proj(x)) * attn)``, per element
(``elementwise``) or per head (``headwise``). Heads, QK-norm and biases follow the teacher, so the
weights can start from the teacher's.

A sliding layer's cache holds at most ``window + sink`` tokens whatever the sequence length.
Sink tokens are the first ``sink`` token *indices*: in a left-padded batch, a padded row's sink slots
hold padding (masked), so that row runs without sinks. Serving engines do not pad, and sink=0 is the
default.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .common import AttentionContext, CacheLayer
from .dense import DenseAttention


class SlidingKVCacheLayer(CacheLayer):
    """Ring buffer of at most ``window + sink`` tokens, ``[batch, kv_heads, slots, head_dim]``.

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
        self.seen = 0

    @property
    def capacity(self) -> int:
        return self.window + self.sink

    def tensors(self):
        return [t for t in (self.k, self.v) if t is not None]

    def slot_positions(self, n: int, device) -> torch.Tensor:
        """Absolute index of the token in each slot after ``n`` tokens, in slot order."""
        heads = torch.arange(min(self.sink, n), device=device)
        ring = max(0, min(n - self.sink, self.window))
        r = torch.arange(ring, device=device)
        latest = self.sink + r + self.window * torch.div(n - 1 - self.sink - r, self.window, rounding_mode="floor")
        return torch.cat([heads, latest])

    def slot_of(self, p: int) -> int:
        return p if p < self.sink else self.sink + (p - self.sink) % self.window

    def update(self, k, v, ctx: AttentionContext):
        n, t = self.seen, k.shape[2]
        if self.k is None:
            self.k, self.v = k[:, :, :0], v[:, :, :0]
        if t == 1:
            slot = self.slot_of(n)
            if slot == self.k.shape[2]:  # still filling up
                self.k = torch.cat([self.k, k], dim=2)
                self.v = torch.cat([self.v, v], dim=2)
            else:  # overwrite the oldest token in place
                self.k[:, :, slot] = k[:, :, 0]
                self.v[:, :, slot] = v[:, :, 0]
            self.seen = n + 1
            return self.k, self.v, None if ctx.single_unpadded else self.slot_positions(n + 1, k.device)
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        key_index = torch.cat([self.slot_positions(n, k.device), torch.arange(n, n + t, device=k.device)])
        total = n + t
        column = torch.full((total,), -1, dtype=torch.long, device=k.device)
        column[key_index] = torch.arange(key_index.shape[0], device=k.device)
        keep = column[self.slot_positions(total, k.device)]
        self.k, self.v = keys[:, :, keep], values[:, :, keep]
        self.seen = total
        return keys, values, key_index


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
    ):
        if layer_type not in ("sliding", "full"):
            raise ValueError(f"layer_type must be 'sliding' or 'full', got {layer_type!r}")
        super().__init__(spec, base_config, layer_idx, window if layer_type == "sliding" else None, sink)
        self.layer_type = layer_type
        self.gate_kind = gate
        if gate == "none":  # no gate parameters at all: the layer's weights are the stock architecture's
            self.g_proj = None
            return
        width = self.num_heads * self.head_dim if gate == "elementwise" else self.num_heads
        self.g_proj = nn.Linear(self.hidden_size, width, bias=True)
        with torch.no_grad():
            self.g_proj.weight.zero_()
            self.g_proj.bias.fill_(gate_bias)

    def gate(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.g_proj is None:
            return out
        g = torch.sigmoid(self.g_proj(x))
        b, t = x.shape[:2]
        g = g.view(b, t, self.num_heads, -1)
        return out * g.to(out.dtype)
