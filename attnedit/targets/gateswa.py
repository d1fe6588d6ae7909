"""GateSWA: gated hybrid sliding-window attention.

Each edited layer is either ``sliding`` (sees the last ``window`` tokens, itself included, plus the
first ``sink`` tokens) or ``full``. The attention output passes a learned sigmoid gate before
``o_proj`` (gated attention, as in Qwen3-Next): ``o_proj(sigmoid(g_proj(x)) * attn)``, per element
(``elementwise``) or per head (``headwise``). Heads, QK-norm and biases follow the teacher, so the
weights can start from the teacher's.

A sliding layer's cache is the ring buffer of ``caches.py``: at most ``window + sink`` tokens whatever the
sequence length (sinks: the first ``sink`` token indices; the default is sink=4).

A sliding layer may keep some of its KV heads full (``full_kv_heads``): see ``split_heads.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .dense import DenseAttention
from .split_heads import set_full_kv_heads


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
