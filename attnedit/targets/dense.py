"""The teacher's own attention (grouped-query, optional QK-norm and biases).

Layers a conversion leaves unedited run this module with the teacher's weights, so an edited model is
one self-contained class whatever mix of layers it has. GateSWA builds on it (``gateswa.py``). Its caches (full
K/V, or the ring buffer of a layer the teacher runs with a window) are those of ``caches.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .caches import KVCacheLayer, SlidingKVCacheLayer, StaticKVCacheLayer, StaticSlidingKVCacheLayer
from .common import AttentionContext, CacheLayer, FusableProjections, RMSNorm, Rotary, apply_rope, attend_cached, attend_new, decode, head_scale
from .split_heads import split_attention, split_cache


class DenseAttention(FusableProjections, nn.Module):
    """Grouped-query attention exactly as the teacher computes it: Llama/Mistral/Qwen2/Qwen3, and what the
    teacher spec adds (``teacher_attention`` in the config): ``scaling`` (softmax scale, default
    ``head_dim ** -0.5``), ``softcap`` (Gemma 2's score soft-capping), ``qk_norm`` ``"head"`` (per head, Qwen3)
    or ``"projection"`` (over the whole q / k projection, OLMo 2), ``norm_offset`` (Gemma's ``1 + weight``)."""

    kind = "dense"
    head_split = None  # a split_heads.HeadSplit: with a window, these KV heads stay full (set_full_kv_heads)

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
        self.qk_norm = "head" if spec["qk_norm"] is True else (spec["qk_norm"] or None)
        if self.qk_norm:
            whole = self.qk_norm == "projection"
            eps, offset = spec["rms_norm_eps"], spec.get("norm_offset", 0.0)
            self.q_norm = RMSNorm(self.num_heads * d if whole else d, eps, offset)
            self.k_norm = RMSNorm(self.num_kv_heads * d if whole else d, eps, offset)
        else:
            self.q_norm = self.k_norm = None
        self.scale = spec.get("scaling") or head_scale(d)
        self.softcap = spec.get("softcap")
        self.rotary = Rotary(d, base_config)

    def new_cache(self, static: bool = False, batch: int = 1, max_length: int = 0, dtype=None, device=None) -> CacheLayer:
        if self.window is not None and self.head_split is not None:
            return split_cache(self, static, batch, max_length, dtype, device)
        if self.window is not None:
            if static:
                return StaticSlidingKVCacheLayer(self.window, self.sink, batch, self.num_kv_heads, self.head_dim, dtype, device)
            return SlidingKVCacheLayer(self.window, self.sink)
        if static:
            return StaticKVCacheLayer(batch, self.num_kv_heads, max_length, self.head_dim, self.head_dim, dtype, device)
        return KVCacheLayer()

    def input_linears(self) -> list[nn.Linear]:
        """The projections of the layer's input (q/k/v, and GateSWA's gate), in the order :meth:`project` splits them."""
        return [self.q_proj, self.k_proj, self.v_proj]

    def projections(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of :meth:`input_linears` on ``x``: one GEMM when fused and no gradient is wanted."""
        fused = self.fused_projections()
        return fused(x) if fused is not None else [lin(x) for lin in self.input_linears()]

    def project(self, x: torch.Tensor, ctx: AttentionContext, outs: list[torch.Tensor] | None = None):
        b, t, _ = x.shape
        outs = outs if outs is not None else self.projections(x)
        q, k = outs[0], outs[1]
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = outs[2].view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = ctx.rope(self.rotary, x.dtype)
        q = apply_rope(q.transpose(1, 2), cos[:, None], sin[:, None])
        k = apply_rope(k.transpose(1, 2), cos[:, None], sin[:, None])
        return q, k, v

    def gate(self, out: torch.Tensor, x: torch.Tensor, pre: torch.Tensor | None = None) -> torch.Tensor:
        """``out`` is ``[batch, tokens, heads, head_dim]``; the plain attention has no gate. ``pre``: the gate's
        pre-activation when the fused projection computed it."""
        return out

    def attention(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        """``q`` [B, H, T, D], ``k``/``v`` [B, Hkv, T, D] of this call's tokens -> [B, H, T, D]."""
        scale, softcap = self.scale, self.softcap
        if self.window is not None and self.head_split is not None:
            return split_attention(self, q, k, v, ctx, scale, softcap)
        if ctx.cache is None:
            return attend_new(q, k, v, ctx, self.window, self.sink, scale, softcap)
        layer = ctx.cache.layers[self.layer_idx]
        if ctx.decoding:
            keys, values, n_filled, valid = layer.decode_update(k, v, ctx)
            return decode(q[:, :, 0], keys, values, n_filled, valid, scale, softcap=softcap)[:, :, None]
        keys, values, key_index = layer.update(k, v, ctx)
        if key_index is None:
            return attend_new(q, keys, values, ctx, self.window, self.sink, scale, softcap)
        return attend_cached(q, keys, values, key_index, ctx, self.window, self.sink, scale, softcap)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        outs = self.projections(x)
        q, k, v = self.project(x, ctx, outs)
        out = self.attention(q, k, v, ctx).transpose(1, 2)
        out = self.gate(out, x, outs[3] if len(outs) > 3 else None)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
