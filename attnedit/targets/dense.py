"""The teacher's own attention (grouped-query, optional QK-norm and biases) and its full K/V cache.

Layers a conversion leaves unedited run this module with the teacher's weights, so an edited model is
one self-contained class whatever mix of layers it has. GateSWA builds on it (``gateswa.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .common import AttentionContext, CacheLayer, RMSNorm, Rotary, apply_rope, attend, head_scale


class KVCacheLayer(CacheLayer):
    """Full cache: keeps K and V of every token, ``[batch, kv_heads, tokens, head_dim]`` each."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.seen = 0

    def tensors(self):
        return [t for t in (self.k, self.v) if t is not None]

    def update(self, k, v, ctx: AttentionContext):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        self.seen += k.shape[2]
        return self.k, self.v, None if ctx.single_unpadded else torch.arange(self.seen, device=k.device)


class DenseAttention(nn.Module):
    """Grouped-query attention exactly as Llama/Mistral/Qwen2/Qwen3 compute it."""

    kind = "dense"

    def __init__(self, spec: dict, base_config: dict, layer_idx: int, window: int | None = None, sink: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = spec["hidden_size"]
        self.num_heads = spec["num_heads"]
        self.num_kv_heads = spec["num_kv_heads"]
        self.head_dim = spec["head_dim"]
        self.window = window
        self.sink = sink
        h, d = self.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=spec["qkv_bias"])
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=spec["qkv_bias"])
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=spec["qkv_bias"])
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=spec["o_bias"])
        if spec["qk_norm"]:
            self.q_norm = RMSNorm(d, spec["rms_norm_eps"])
            self.k_norm = RMSNorm(d, spec["rms_norm_eps"])
        else:
            self.q_norm = self.k_norm = None
        self.rotary = Rotary(d, base_config)

    def new_cache(self) -> CacheLayer:
        if self.window is None:
            return KVCacheLayer()
        from .gateswa import SlidingKVCacheLayer

        return SlidingKVCacheLayer(self.window, self.sink)

    def kv_values_per_token(self, context: int) -> float:
        """Cached values per token per layer at sequence length ``context`` (K and V together)."""
        per_token = 2 * self.num_kv_heads * self.head_dim
        if self.window is None or context <= 0:
            return float(per_token)
        return per_token * min(self.window + self.sink, context) / context

    def project(self, x: torch.Tensor, ctx: AttentionContext):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = ctx.rope(self.rotary, x.dtype)
        q = apply_rope(q.transpose(1, 2), cos[:, None], sin[:, None])
        k = apply_rope(k.transpose(1, 2), cos[:, None], sin[:, None])
        return q, k, v

    def gate(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out`` is ``[batch, tokens, heads, head_dim]``; the plain attention has no gate."""
        return out

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, ctx)
        if ctx.cache is not None:
            k, v, key_index = ctx.cache.layers[self.layer_idx].update(k, v, ctx)
        else:
            key_index = torch.arange(t, device=x.device)
        mask = None if ctx.single_unpadded else ctx.mask(key_index, self.window, self.sink)
        out = attend(q, k, v, mask, head_scale(self.head_dim)).transpose(1, 2)
        out = self.gate(out, x)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
