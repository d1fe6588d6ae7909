"""MLA: multi-head latent attention (DeepSeek-V2/V3 form) and its latent cache.

    q            = q_proj(x)                     or  q_b_proj(q_a_layernorm(q_a_proj(x)))
    [c_kv, k_pe] = kv_a_proj_with_mqa(x);  c_kv = kv_a_layernorm(c_kv)
    [k_nope, v]  = kv_b_proj(c_kv)               (per head)
    score        = (q_nope . k_nope + q_pe . rope(k_pe)) / sqrt(qk_nope_head_dim + qk_rope_head_dim)

``k_pe`` is one RoPE key shared by all heads. Its RoPE base defaults to ``theta ** (rope_dim / head_dim)``
(teacher's ``theta``), which gives MLA's ``rope_dim / 2`` frequency pairs exactly the teacher's highest
ones: the position-sensitive part of the teacher's attention keeps its RoPE. The cache holds only ``c_kv`` and the rotated ``k_pe``:
``kv_lora_rank + qk_rope_head_dim`` values per token per layer. Prefill and training use the
expanded form; decoding absorbs ``W_uk`` into the query and ``W_uv`` into the output, which makes
MLA a single-KV-head attention over the latent. Both give the same result (tested).
Weight names are DeepSeek-V3's, so an export loads in stock DeepSeek-V3 code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .caches import SlidingKVCacheLayer, StaticSlidingKVCacheLayer
from .common import (
    AttentionContext,
    CacheLayer,
    FusableProjections,
    RMSNorm,
    Rotary,
    apply_rope,
    attend,
    attend_softcapped,
    decode_softcapped,
    head_scale,
    hooked,
    mask_tensor,
    static_buffer,
)
from .kernels import mla_decode_attention


def with_rope_theta(base_config: dict, theta: float | None) -> dict:
    """The teacher's config with another RoPE base (None: unchanged)."""
    if theta is None:
        return base_config
    cfg = dict(base_config)
    params = dict(cfg.get("rope_parameters") or {"rope_type": "default"})
    params["rope_theta"] = theta
    cfg["rope_parameters"], cfg["rope_theta"] = params, theta
    return cfg


class LatentCacheLayer(CacheLayer):
    """Growing cache of ``[c_kv, rotated k_pe]`` in one tensor ``[batch, tokens, kv_lora_rank + rope_dim]``:
    the keys of the absorbed (MQA) decode as they stand, and its first ``kv_lora_rank`` columns the values."""

    def __init__(self):
        self.latent: torch.Tensor | None = None
        self.n_cached = 0

    def tensors(self):
        return [] if self.latent is None else [self.latent]

    def update(self, latent, ctx: AttentionContext):
        first = self.latent is None
        self.latent = latent if first else torch.cat([self.latent, latent], dim=1)
        self.n_cached += latent.shape[1]
        return self.latent, None if first else torch.arange(self.n_cached, device=latent.device)


class StaticLatentCacheLayer(CacheLayer):
    """Static latent cache ``[batch, max_length, kv_lora_rank + rope_dim]``, written in place."""

    static = True
    is_compileable = True

    def __init__(self, batch: int, max_length: int, width: int, dtype, device):
        self.latent = static_buffer((batch, max_length, width), dtype, device)

    def tensors(self):
        return [self.latent]

    def update(self, latent, ctx: AttentionContext):
        n_cached, t = ctx.n_cached, latent.shape[1]
        self.latent[:, n_cached : n_cached + t] = latent
        if n_cached == 0:
            return latent, None
        return self.latent[:, : n_cached + t], torch.arange(n_cached + t, device=latent.device)

    def decode_update(self, latent, ctx: AttentionContext):
        self.latent.index_copy_(1, ctx.n_written.view(1), latent)
        return self.latent, ctx.n_filled, ctx.key_valid


class SlidingLatentCacheLayer(SlidingKVCacheLayer):
    """Growing ring buffer of latents for an MLA layer with a window: at most ``window + sink`` tokens of
    ``[c_kv, rotated k_pe]``, kept as a sliding layer's ring keeps keys (one latent "head", no separate values)."""

    def update(self, latent, ctx: AttentionContext):
        b, t, _ = latent.shape
        keys, _, key_index = super().update(latent[:, None], latent.new_empty(b, 1, t, 0), ctx)
        return keys[:, 0], key_index

    def tensors(self):
        return [] if self.k is None else [self.k]


class StaticSlidingLatentCacheLayer(StaticSlidingKVCacheLayer):
    """Static ring buffer of latents ``[batch, 1, window + sink, kv_lora_rank + rope_dim]``, written in place."""

    def __init__(self, window: int, sink: int, batch: int, width: int, dtype, device):
        self.window, self.sink = window, sink
        self.k = static_buffer((batch, 1, window + sink, width), dtype, device)
        self.v = static_buffer((batch, 1, window + sink, 0), dtype, device)  # the values are the latent itself

    def tensors(self):
        return [self.k]

    def update(self, latent, ctx: AttentionContext):
        b, t, _ = latent.shape
        keys, _, key_index = super().update(latent[:, None], latent.new_empty(b, 1, t, 0), ctx)
        return keys[:, 0], key_index

    def decode_update(self, latent, ctx: AttentionContext):
        keys, _, n_filled, valid = super().decode_update(latent[:, None], latent.new_empty(latent.shape[0], 1, 1, 0), ctx)
        return keys[:, 0], n_filled, valid


FOLD_KERNEL_BYTES = 4 << 20  # what one kernel's fixed cost reads at a decode step's bandwidth (H100: ~4 us, ~12 MB)


class FoldedAbsorbed:
    """An MLA layer's absorbed decode with its per-head up-projections folded into the projections around them
    (DeepSeek-V2: ``W_uk`` absorbed into the query's projection, ``W_uv`` into ``o_proj``), for inference.

    Unfolded, a decode step computes ``q_lat = q_nope W_uk`` and ``out W_uv`` as per-head batched matmuls, two
    kernels a layer besides the projections. Folded, the query's last projection yields ``[q_lat, q_pe]`` directly
    (``W_q'[h] = W_uk[h]^T W_q_nope[h]``, its bias likewise) and ``o_proj`` reads the latent output (``W_o'[:, h] =
    W_o[:, h] W_uv[h]``): the same result with two fewer kernels. A side folds only where its folded weight reads at
    most ``kernel_bytes`` more than the weights it replaces (``[heads x (rank + rope), in]`` against ``[heads x
    (nope + rope), in]`` plus ``W_uk``; ``[hidden, heads x rank]`` against ``o_proj`` plus ``W_uv``): at a small
    latent (Qwen2.5-0.5B's rank 56) both sides, at DeepSeek's 512 neither (4x the bytes).

    The folded weights are copies (computed in float32, stored in the parameters' dtype), held beside the
    parameters: :attr:`extra_bytes` more memory, :attr:`read_delta` bytes more (or fewer) read by a decode step.
    They are computed again when a source parameter changed (trained in place, replaced by ``.to()`` or
    ``load_state_dict``) on the next eager call; a compiled step keeps what it captured."""

    def __init__(self, attn: MLAAttention, kernel_bytes: int = FOLD_KERNEL_BYTES):
        self.kernel_bytes = kernel_bytes
        self.query = self.query_bias = self.output = None
        self.stamp = self._stamp(attn)
        h, nope, rope, r, v = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.kv_lora_rank, attn.v_head_dim
        q_lin = attn.last_query_proj
        d_in, item = q_lin.in_features, q_lin.weight.element_size()
        fold_q = (h * (r + rope) * d_in - h * (nope + rope) * d_in - h * nope * r) * item <= kernel_bytes
        fold_o = (attn.hidden_size * h * r - attn.hidden_size * h * v - h * v * r) * item <= kernel_bytes
        with torch.inference_mode(False), torch.no_grad():
            w_uk, w_uv = (w.float() for w in attn.absorbed_weights())  # [h, nope, r], [h, v, r]
            if fold_q:
                wq = q_lin.weight.float().view(h, nope + rope, d_in)
                lat = torch.einsum("hnr,hnd->hrd", w_uk, wq[:, :nope])
                weights = [torch.cat([lat, wq[:, nope:]], dim=1).reshape(h * (r + rope), d_in)]
                biases = [None]
                if q_lin.bias is not None:
                    bq = q_lin.bias.float().view(h, nope + rope)
                    biases = [torch.cat([torch.einsum("hnr,hn->hr", w_uk, bq[:, :nope]), bq[:, nope:]], dim=1).reshape(-1)]
                if attn.q_lora_rank is None:  # the latent's projection reads the same input: one GEMM for both
                    kv_a = attn.kv_a_proj_with_mqa
                    weights.append(kv_a.weight.float())
                    biases.append(None if kv_a.bias is None else kv_a.bias.float())
                dtype = q_lin.weight.dtype
                self.query = torch.cat(weights).to(dtype)
                if any(b is not None for b in biases):
                    sizes = [w.shape[0] for w in weights]
                    self.query_bias = torch.cat([b if b is not None else w.new_zeros(n) for b, w, n in zip(biases, weights, sizes)]).to(dtype)
            if fold_o:
                wo = attn.o_proj.weight.float().view(attn.hidden_size, h, v)
                self.output = torch.einsum("ihv,hvr->ihr", wo, w_uv).reshape(attn.hidden_size, h * r).to(attn.o_proj.weight.dtype)

    @staticmethod
    def _sources(attn: MLAAttention) -> list[torch.Tensor]:
        mods = (attn.q_proj, attn.kv_a_proj_with_mqa) if attn.q_lora_rank is None else (attn.q_b_proj,)
        ts = [t for m in (*mods, attn.kv_b_proj, attn.o_proj) for t in (m.weight, m.bias)]
        return [t for t in ts if t is not None]

    @classmethod
    def _stamp(cls, attn: MLAAttention) -> list[tuple]:
        return [(t.data_ptr(), t._version, t.dtype) for t in cls._sources(attn)]

    def current(self, attn: MLAAttention) -> bool:
        """Whether the source parameters are unchanged since folding (host check; eager code only)."""
        return self._stamp(attn) == self.stamp

    @property
    def sides(self) -> str:
        """Which sides folded: 'query+output', 'query', 'output' or 'none'."""
        return "+".join(n for n, t in (("query", self.query), ("output", self.output)) if t is not None) or "none"

    @property
    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.query, self.query_bias, self.output) if t is not None)

    def read_delta(self, attn: MLAAttention) -> int:
        """Bytes a decode step reads with these weights minus without them."""
        q_lin = attn.last_query_proj
        w_uk, w_uv = attn.absorbed_weights()
        size = lambda *ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
        delta = 0
        if self.query is not None:
            also = (attn.kv_a_proj_with_mqa.weight, attn.kv_a_proj_with_mqa.bias) if attn.q_lora_rank is None else ()
            delta += size(self.query, self.query_bias) - size(q_lin.weight, q_lin.bias, w_uk, *also)
        if self.output is not None:
            delta += size(self.output) - size(attn.o_proj.weight, w_uv)
        return delta


class MLAAttention(FusableProjections, nn.Module):
    kind = "mla"

    def __init__(
        self,
        spec: dict,
        base_config: dict,
        layer_idx: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        qk_nope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        absorb: str = "auto",
        rope_theta: float | None = None,
        bias: bool = False,
        window: int | None = None,
        sink: int = 0,
        softcap: float | None = None,
    ):
        super().__init__()
        if absorb not in ("auto", "always", "never"):
            raise ValueError(f"absorb must be auto, always or never, got {absorb!r}")
        self.layer_idx = layer_idx
        self.hidden_size = h = spec["hidden_size"]
        self.num_heads = spec["num_heads"]
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.absorb = absorb
        eps = 1e-6  # DeepSeek-V3's latent norms use 1e-6 whatever the model's eps: exports stay exact
        # bias: the teacher's q/k/v biases (Qwen2) in the places they survive exactly: q's on the query,
        # the RoPE key's on kv_a_proj_with_mqa, the values' folded into o_proj (see surgery/init.py)
        if q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * self.qk_head_dim, bias=bias)
        else:
            self.q_a_proj = nn.Linear(h, q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps)
            self.q_b_proj = nn.Linear(q_lora_rank, self.num_heads * self.qk_head_dim, bias=bias)
        self.kv_a_proj_with_mqa = nn.Linear(h, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, self.num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * v_head_dim, h, bias=bias)
        self.rope_theta = rope_theta
        self.rotary = Rotary(qk_rope_head_dim, with_rope_theta(base_config, rope_theta))
        # a teacher layer that slides (Gemma, Mistral) stays windowed: a ring buffer of latents; softcap: Gemma 2's scores
        self.window, self.sink, self.softcap = window, sink, softcap

    def new_cache(self, static: bool = False, batch: int = 1, max_length: int = 0, dtype=None, device=None) -> CacheLayer:
        width = self.kv_lora_rank + self.qk_rope_head_dim
        if self.window is not None:
            if static:
                return StaticSlidingLatentCacheLayer(self.window, self.sink, batch, width, dtype, device)
            return SlidingLatentCacheLayer(self.window, self.sink)
        if static:
            return StaticLatentCacheLayer(batch, max_length, width, dtype, device)
        return LatentCacheLayer()

    def input_linears(self) -> list[nn.Linear]:
        """The projections of the layer's input: the query's first one and ``kv_a_proj_with_mqa``."""
        return [self.q_proj if self.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa]

    @property
    def last_query_proj(self) -> nn.Linear:
        """The query's last projection, whose output is per head ``[nope, rope]``: ``q_proj``, or ``q_b_proj``."""
        return self.q_proj if self.q_lora_rank is None else self.q_b_proj

    def query(self, x: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """The query; ``first``: the output of its first projection when the fused GEMM computed it."""
        if self.q_lora_rank is None:
            return first if first is not None else self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(first if first is not None else self.q_a_proj(x)))

    _folded: FoldedAbsorbed | None = None

    def fold_absorbed(self, fold: bool = True, kernel_bytes: int = FOLD_KERNEL_BYTES) -> None:
        """Fold the absorbed decode's ``W_uk`` and ``W_uv`` into the projections around them, where that reads at
        most ``kernel_bytes`` more (:class:`FoldedAbsorbed`); ``fold=False`` drops the folded weights."""
        self._folded = FoldedAbsorbed(self, kernel_bytes) if fold else None

    def folded_absorbed(self) -> FoldedAbsorbed | None:
        """The folded weights for this call, or None: not folded, gradients wanted, or a forward hook on one of the
        projections they stand in for (hooks must see their calls). Folds again if a source parameter changed
        since (a host check, in eager code)."""
        folded = self._folded
        if folded is None or torch.is_grad_enabled():
            return None
        q_lin = self.last_query_proj
        if any(hooked(m) for m in (q_lin, self.kv_a_proj_with_mqa, self.kv_b_proj, self.o_proj)):
            return None
        if not torch.compiler.is_compiling() and not folded.current(self):
            folded = self._folded = FoldedAbsorbed(self, folded.kernel_bytes)
        return folded

    def use_absorbed(self, ctx: AttentionContext) -> bool:
        if self.absorb == "auto":
            return ctx.cache is not None and ctx.q_len <= 16
        return self.absorb == "always"

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_uk`` [heads, nope, rank] and ``W_uv`` [heads, v, rank], views of ``kv_b_proj``."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        hds, nope, rope, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        decoding = ctx.cache is not None and ctx.decoding
        folded = self.folded_absorbed() if decoding or self.use_absorbed(ctx) else None
        fold_q, fold_o = folded is not None and folded.query is not None, folded is not None and folded.output is not None
        if fold_q and self.q_lora_rank is None:  # one GEMM: the query in the latent's space and the latent
            q, kv_a = F.linear(x, folded.query, folded.query_bias).split([hds * (r + rope), r + rope], dim=-1)
        else:
            fused = self.fused_projections()
            q_first, kv_a = fused(x) if fused is not None else (None, self.kv_a_proj_with_mqa(x))
            if fold_q:
                q = F.linear(self.q_a_layernorm(q_first if q_first is not None else self.q_a_proj(x)), folded.query, folded.query_bias)
            else:
                q = self.query(x, q_first)
        q = q.view(b, t, hds, -1).transpose(1, 2)
        q_nope, q_pe = q.split([q.shape[-1] - rope, rope], dim=-1)  # q_nope: the query in the latent's space when folded
        c_kv, k_pe = kv_a.split([r, rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        cos, sin = ctx.rope(self.rotary, x.dtype)
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None])
        latent = torch.cat([c_kv, apply_rope(k_pe, cos, sin)], dim=-1)
        scale = head_scale(self.qk_head_dim)
        if decoding:
            # absorbed decode: one latent KV head read once, values = its first r columns
            buf, n_filled, valid = ctx.cache.layers[self.layer_idx].decode_update(latent, ctx)
            w_uk, w_uv = self.absorbed_weights()
            q_lat = q_nope[:, :, 0] if fold_q else torch.einsum("bhn,hnr->bhr", q_nope[:, :, 0], w_uk)
            queries = torch.cat([q_lat, q_pe[:, :, 0]], dim=-1)
            if self.softcap is not None:
                out = decode_softcapped(queries, buf[:, None], None, n_filled, valid, scale, self.softcap, v_dim=r)
            else:
                out = mla_decode_attention(queries, buf, n_filled, valid, scale, r)
            if fold_o:
                return F.linear(out.reshape(b, 1, hds * r), folded.output, self.o_proj.bias)
            out = torch.einsum("bhr,hvr->bhv", out, w_uv)
            return self.o_proj(out.reshape(b, 1, hds * self.v_head_dim))
        if ctx.cache is not None:
            latent, key_index = ctx.cache.layers[self.layer_idx].update(latent, ctx)
        else:
            key_index = None
        c_kv, k_pe = latent[..., :r], latent[..., r:]
        if key_index is None:  # the keys are this call's tokens
            windowed = ctx.key_padding is not None or self.window is not None
            mask = ctx.mask(torch.arange(t, device=x.device), self.window, self.sink, force=True) if windowed else None
        else:
            mask = None if ctx.all_keys_visible else ctx.mask(key_index, self.window, self.sink)
        n = c_kv.shape[1]
        if self.use_absorbed(ctx):
            w_uk, w_uv = self.absorbed_weights()
            q_lat = q_nope if fold_q else torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
            # one latent KV head shared by all heads: fold the heads into the query axis (an MQA read of
            # the latent cache, never expanded per head)
            queries = torch.cat([q_lat, q_pe], dim=-1).reshape(b, 1, hds * t, -1)
            if t > 1 and not mask_tensor(mask):  # heads x tokens fold into one axis: a real mask
                mask = ctx.mask(key_index if key_index is not None else torch.arange(n, device=x.device), force=True)
            if mask is not None:
                mask = mask.expand(-1, -1, t, -1).repeat(1, 1, hds, 1)
            # heads x tokens are one query axis here, so never let SDPA read it as causal
            if self.softcap is not None:
                out = attend_softcapped(queries, latent[:, None], c_kv[:, None], mask, scale, self.softcap).view(b, hds, t, r)
            else:
                out = F.scaled_dot_product_attention(queries, latent[:, None], c_kv[:, None], attn_mask=mask, scale=scale, enable_gqa=True).view(b, hds, t, r)
            if fold_o:
                return F.linear(out.transpose(1, 2).reshape(b, t, hds * r), folded.output, self.o_proj.bias)
            out = torch.einsum("bhtr,hvr->bhtv", out, w_uv)
        else:
            kv = self.kv_b_proj(c_kv).view(b, n, hds, nope + self.v_head_dim).transpose(1, 2)
            k_nope, v = kv.split([nope, self.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_pe[:, None].expand(b, hds, n, rope)], dim=-1)
            qk = nope + rope
            if x.is_cuda and qk != self.v_head_dim and qk <= 256 and not mask_tensor(mask):
                # flash attention needs one head size for q, k and v: zero columns of v cost less than its fallback
                v = F.pad(v, (0, qk - self.v_head_dim))
                out = attend(torch.cat([q_nope, q_pe], dim=-1), k, v, mask, scale, self.softcap)[..., : self.v_head_dim]
            else:
                out = attend(torch.cat([q_nope, q_pe], dim=-1), k, v, mask, scale, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, hds * self.v_head_dim))
