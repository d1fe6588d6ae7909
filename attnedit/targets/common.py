"""Pieces every attnedit attention shares: RMSNorm, RoPE, the per-forward context and masks.

This folder (``attnedit/targets``) is copied verbatim into every saved checkpoint as remote code, so
its files import only torch, transformers and each other (relative imports), never ``attnedit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 (as Llama, Qwen and DeepSeek do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split ("rotate_half") RoPE, the Llama/Qwen layout. ``cos``/``sin`` broadcast against ``x``."""
    return x * cos + rotate_half(x) * sin


class Rotary:
    """RoPE frequencies of size ``dim`` with the teacher's settings (theta and any scaling type).

    Not an ``nn.Module`` and holds no buffers: frequencies are recomputed per device on first use, so
    loading on the meta device never leaves them uninitialised.
    """

    def __init__(self, dim: int, base_config: dict):
        if dim % 2:
            raise ValueError(f"RoPE dimension must be even, got {dim}")
        self.dim = dim
        self.base_config = base_config
        self._cache: dict = {}

    def _frequencies(self, device) -> tuple[torch.Tensor, float]:
        params = dict(self.base_config.get("rope_parameters") or {})
        theta = params.get("rope_theta", self.base_config.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type == "default":
            inv = 1.0 / (theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim))
            return inv, 1.0
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        cfg = dict(self.base_config)
        cfg.update(head_dim=self.dim, partial_rotary_factor=1.0)
        config = AutoConfig.for_model(**cfg)
        inv, scale = ROPE_INIT_FUNCTIONS[rope_type](config, device)
        return inv.float(), float(scale)

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (position_ids.device,)
        if key not in self._cache:
            self._cache[key] = self._frequencies(position_ids.device)
        inv, scale = self._cache[key]
        freqs = position_ids[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


@dataclass
class AttentionContext:
    """What every attention layer needs to know about the current forward call.

    ``key_padding`` is ``[batch, past + q_len]`` (True for real tokens) or None when nothing is padded.
    ``past_length`` counts the tokens already in the cache before this call.
    """

    position_ids: torch.Tensor
    past_length: int
    q_len: int
    key_padding: torch.Tensor | None
    cache: object | None
    _rope: dict = field(default_factory=dict)

    def rope(self, rotary: Rotary, dtype: torch.dtype):
        key = (rotary.dim, id(rotary.base_config), dtype)
        if key not in self._rope:
            self._rope[key] = rotary.cos_sin(self.position_ids, dtype)
        return self._rope[key]

    @property
    def single_unpadded(self) -> bool:
        """One new token and no padding: every cached key is visible (full caches hold the past, ring
        buffers hold exactly the window and sinks), so decoding needs neither a mask nor key indices."""
        return self.q_len == 1 and self.key_padding is None

    def query_index(self, device) -> torch.Tensor:
        return torch.arange(self.past_length, self.past_length + self.q_len, device=device)

    def mask(
        self, key_index: torch.Tensor, window: int | None = None, sink: int = 0, force: bool = False
    ) -> torch.Tensor | None:
        """Boolean attention mask ``[B|1, 1, q_len, n_keys]`` (True = may attend), or None for plain causal.

        ``key_index`` holds the absolute index (0-based token count) of every key column. A key is visible
        when it is not in the future, not padding and, with a ``window``, among the last ``window`` tokens
        (the query itself included) or among the first ``sink`` tokens. ``force`` returns the mask even
        where plain causal attention (None) would do.
        """
        n = key_index.shape[0]
        plain = (
            window is None
            and self.key_padding is None
            and n == self.past_length + self.q_len
            and (self.past_length == 0 or self.q_len == 1)
        )
        if plain and not force:
            return None
        q = self.query_index(key_index.device)[:, None]
        k = key_index[None, :]
        allowed = k <= q
        if window is not None:
            allowed = allowed & ((k > q - window) | (k < sink))
        allowed = allowed[None, None]
        if self.key_padding is not None:
            allowed = allowed & self.key_padding[:, key_index][:, None, None, :]
            # a padded query row would see nothing; let it see itself so the softmax stays finite
            allowed = allowed | (k == q)[None, None]
        return allowed


def attend(q, k, v, mask, scale: float) -> torch.Tensor:
    """Scaled dot-product attention; K/V may have fewer heads than Q (grouped-query, or one latent
    head for MLA). ``mask`` None means plain causal, or one query at the end of the keys."""
    gqa = k.shape[1] != q.shape[1]
    causal = mask is None and q.shape[2] > 1 and q.shape[2] == k.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


class CacheLayer:
    """One layer's slot in an :class:`AttnEditCache`. Subclasses store their own tensors."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False
    is_initialized = True

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def allocated_bytes(self) -> int:
        """Bytes of storage actually held by this layer's cache tensors."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def _map(self, fn) -> None:
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, fn(value))

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, None)
        self.seen = 0


def head_scale(dim: int) -> float:
    return 1.0 / math.sqrt(dim)
