"""A toy attention written outside attnedit through its target API (``tests/toy_target.py`` registers it):
tied keys and values. Each KV head caches one vector per token, its rotated key, which also serves as its
value: ``kv_heads * head_dim`` values per token, half of a GQA cache with the same heads.

This file is what the checkpoint carries (``Target.code``), so it imports only torch and attnedit's own remote
code: beside ``common.py`` in a checkpoint the relative import works; imported as a plain module (the tests)
it falls back to the installed package.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # inside a checkpoint, beside attnedit's remote code
    from .common import AttentionContext, CacheLayer, Rotary, apply_rope, attend, decode, head_scale, static_buffer
except ImportError:  # a plain module
    from attnedit.targets.common import AttentionContext, CacheLayer, Rotary, apply_rope, attend, decode, head_scale, static_buffer


class TiedKVCache(CacheLayer):
    """Growing: the rotated keys of every token, ``[batch, kv_heads, tokens, head_dim]``."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.n_cached = 0

    def tensors(self):
        return [] if self.k is None else [self.k]

    def update(self, k, ctx: AttentionContext):
        first = self.k is None
        self.k = k if first else torch.cat([self.k, k], dim=2)
        self.n_cached += k.shape[2]
        return self.k, None if first else torch.arange(self.n_cached, device=k.device)


class StaticTiedKVCache(CacheLayer):
    """Static: ``[batch, kv_heads, max_length, head_dim]`` allocated once, written in place."""

    static = True
    is_compileable = True

    def __init__(self, batch: int, kv_heads: int, max_length: int, head_dim: int, dtype, device):
        self.k = static_buffer((batch, kv_heads, max_length, head_dim), dtype, device)

    def tensors(self):
        return [self.k]

    def update(self, k, ctx: AttentionContext):
        n, t = ctx.n_cached, k.shape[2]
        self.k[:, :, n : n + t] = k
        return (k, None) if n == 0 else (self.k[:, :, : n + t], torch.arange(n + t, device=k.device))

    def decode_update(self, k, ctx: AttentionContext):
        self.k.index_copy_(2, ctx.n_written.view(1), k)
        return self.k, ctx.n_filled, ctx.key_valid


class TiedKVAttention(nn.Module):
    kind = "tiedkv"

    def __init__(self, spec: dict, base_config: dict, layer_idx: int, kv_heads: int):
        super().__init__()
        self.layer_idx, self.heads, self.kv_heads, self.head_dim = layer_idx, spec["num_heads"], kv_heads, spec["head_dim"]
        h, d = spec["hidden_size"], self.head_dim
        self.q_proj = nn.Linear(h, self.heads * d, bias=spec["qkv_bias"])
        self.k_proj = nn.Linear(h, kv_heads * d, bias=spec["qkv_bias"])
        self.o_proj = nn.Linear(self.heads * d, h, bias=spec["o_bias"])
        self.rotary = Rotary(d, base_config)

    def new_cache(self, static: bool = False, batch: int = 1, max_length: int = 0, dtype=None, device=None):
        return StaticTiedKVCache(batch, self.kv_heads, max_length, self.head_dim, dtype, device) if static else TiedKVCache()

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = ctx.rope(self.rotary, x.dtype)
        q = apply_rope(self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2), cos[:, None], sin[:, None])
        k = apply_rope(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), cos[:, None], sin[:, None])
        scale = head_scale(self.head_dim)
        if ctx.cache is not None and ctx.decoding:
            keys, n_filled, valid = ctx.cache.layers[self.layer_idx].decode_update(k, ctx)
            out = decode(q[:, :, 0], keys, None, n_filled, valid, scale, v_dim=self.head_dim)[:, :, None]
        else:
            key_index = None
            if ctx.cache is not None:
                k, key_index = ctx.cache.layers[self.layer_idx].update(k, ctx)
            if key_index is None:
                mask = None if ctx.key_padding is None else ctx.mask(torch.arange(t, device=x.device), force=True)
            else:
                mask = None if ctx.all_keys_visible else ctx.mask(key_index)
            out = attend(q, k, k, mask, scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
