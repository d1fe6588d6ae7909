"""Pieces every attnedit attention shares: RMSNorm, RoPE, the per-forward context and masks.

This folder (``attnedit/targets``) is copied verbatim into every saved checkpoint as remote code, so
its files import only torch, transformers and each other (relative imports), never ``attnedit``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.bias import CausalBias, causal_lower_right

from .kernels import CHUNK_FLEX_MIN_QUERIES, _use_fast, chunk_block_mask, decode_attention, sliding_attention, sliding_chunk_attention, window_mask


def checkpoint(fn, *args):
    """``fn(*args)`` under non-reentrant gradient checkpointing, with the compiled kernels inside it compiled.

    ``torch.utils.checkpoint.checkpoint`` runs its function with TorchDynamo disabled, so eagerly a compiled
    kernel inside it runs uncompiled: FlexAttention (a sliding layer's training kernel) then holds ``[T, T]``
    scores, 4 GiB a sequence and layer for 32 heads at 8k. Eagerly this calls the checkpoint underneath that switch; while
    ``torch.compile`` traces, the checkpoint itself, which dynamo turns into its checkpoint operator."""
    run = torch.utils.checkpoint.checkpoint
    if not torch.compiler.is_compiling():
        run = getattr(run, "__wrapped__", run)
    return run(fn, *args, use_reentrant=False)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 (as Llama, Qwen and DeepSeek do).

    ``offset=1.0`` is Gemma's form: the gain is ``1 + weight`` (weights start at 0), applied in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split ("rotate_half") RoPE, the Llama/Qwen layout. ``cos``/``sin`` broadcast against ``x``."""
    return x * cos + rotate_half(x) * sin


_ROPE_TABLES: dict = {}


class Rotary:
    """RoPE frequencies of size ``dim`` with the teacher's settings (theta and any scaling type).

    Not an ``nn.Module`` and holds no buffers: frequencies are computed per device on first use (so
    loading on the meta device never leaves them uninitialised) and shared by every layer with the same
    ``(dim, RoPE settings)`` through a module-level table; within one forward call the cos/sin of the
    positions are computed once per ``key`` and reused by all layers (:meth:`AttentionContext.rope`).
    """

    def __init__(self, dim: int, base_config: dict):
        if dim % 2:
            raise ValueError(f"RoPE dimension must be even, got {dim}")
        self.dim = dim
        self.base_config = base_config
        params = dict(base_config.get("rope_parameters") or {})
        theta = params.get("rope_theta", base_config.get("rope_theta", 10000.0))
        self.key = (dim, float(theta), repr(sorted((k, repr(v)) for k, v in params.items() if k != "rope_theta")))

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

    def frequencies(self, device) -> tuple[torch.Tensor, float]:
        """The inverse frequencies and the attention scaling, from the table (filled outside ``torch.compile``:
        a write while tracing a gradient checkpoint is a side effect that would make dynamo run it eagerly)."""
        key = (self.key, str(device))
        found = _ROPE_TABLES.get(key)
        if found is None:
            found = self._frequencies(device)
            if not torch.compiler.is_compiling():
                _ROPE_TABLES[key] = found
        return found

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv, scale = self.frequencies(position_ids.device)
        freqs = position_ids[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


class FusedLinears:
    """Linear layers that read the same input, run at inference as one GEMM (fewer, larger kernels per decode step).

    Their weights (and biases) are made views into one tensor, so the fused weight costs no memory and always
    holds the layers' current values: training updates them in place, ``load_state_dict`` copies into them,
    and ``state_dict``/``save_pretrained`` still see the separate parameters. Used only without gradients (the
    separate layers keep their autograd); if the parameters were replaced since (``.to()``, a cast), the
    weights are fused again on the next eager call.
    """

    def __init__(self, linears: list):
        self.linears = list(linears)
        self.sizes = [lin.out_features for lin in self.linears]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]  # each layer's first row
        # never inference tensors (fusing inside inference_mode would make the parameters unusable for training)
        with torch.inference_mode(False), torch.no_grad():
            self.weight = torch.cat([lin.weight.detach() for lin in self.linears])
            self.bias = None
            if any(lin.bias is not None for lin in self.linears):
                self.bias = torch.cat([lin.bias.detach() if lin.bias is not None else self.weight.new_zeros(lin.out_features) for lin in self.linears])
            for lin, off, n in zip(self.linears, self.offsets, self.sizes):
                lin.weight.data = self.weight[off : off + n]
                if lin.bias is not None:
                    lin.bias.data = self.bias[off : off + n]

    def current(self) -> bool:
        """Whether the layers' weights and biases are still views of the fused tensors (host check; eager code only)."""
        row = self.weight.stride(0) * self.weight.element_size()
        for lin, off in zip(self.linears, self.offsets):
            if lin.weight.data_ptr() != self.weight.data_ptr() + off * row:
                return False
            if lin.bias is not None and lin.bias.data_ptr() != self.bias.data_ptr() + off * self.bias.element_size():
                return False
        return True

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))

    def release(self) -> None:
        """Give every layer its own storage again."""
        with torch.inference_mode(False), torch.no_grad():
            for lin in self.linears:
                lin.weight.data = lin.weight.data.clone()
                if lin.bias is not None:
                    lin.bias.data = lin.bias.data.clone()


class FusableProjections:
    """An attention whose projections of its input (:meth:`input_linears`) can run as one GEMM:
    ``AttnEditForCausalLM.fuse_projections()`` calls :meth:`fuse`; :meth:`fused_projections` is the fused call
    for this forward, or None (see :func:`fused_call`)."""

    _fused: FusedLinears | None = None

    def input_linears(self) -> list:
        raise NotImplementedError

    def fuse(self) -> None:
        self._fused = FusedLinears(self.input_linears())

    def fused_projections(self) -> FusedLinears | None:
        return fused_call(self, "_fused", self.input_linears())


def hooked(module) -> bool:
    """Whether ``module`` has a forward hook (a fast path that skips its call must not run then)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def fused_call(owner, name: str, linears: list, *also):
    """``owner``'s :class:`FusedLinears` under attribute ``name`` for a call without gradients, or None: unfused,
    gradients wanted, a layer replaced since fusing (``linears`` are the layers in place now), or a forward hook
    on one of them or on ``also`` (hooks must see their calls). Fuses again if the parameters were replaced since
    (a host check, in eager code; the model re-fuses after ``.to()`` and ``load_state_dict`` itself)."""
    fused = getattr(owner, name, None)
    if fused is None or torch.is_grad_enabled():
        return None
    if len(linears) != len(fused.linears) or any(a is not b for a, b in zip(linears, fused.linears)):
        return None
    if any(hooked(m) for m in (*linears, *also)):
        return None
    if not torch.compiler.is_compiling() and not fused.current():
        fused = FusedLinears(fused.linears)
        setattr(owner, name, fused)
    return fused


@dataclass
class AttentionContext:
    """What every attention layer needs to know about the current forward call.

    ``key_padding`` is ``[batch, n_cached + q_len]`` (True for real tokens) or None when nothing is padded.
    ``n_cached`` counts the tokens already in the cache before this call; it is None in a decode
    step over a static cache, where that count lives on the device (``n_written``: the slot the new
    token goes to; ``n_filled``: slots holding keys after the write; ``key_valid``: [batch, slots]
    False for padding, or None), so that a compiled step never reads it on the host.
    """

    position_ids: torch.Tensor
    n_cached: int | None
    q_len: int
    key_padding: torch.Tensor | None
    cache: object | None
    n_written: torch.Tensor | None = None
    n_filled: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    new_mask: torch.Tensor | None = None  # [batch, q_len] bool of this call's tokens, None when none is padding
    _memo: dict = field(default_factory=dict)

    @property
    def decoding(self) -> bool:
        """A one-token step over a static cache (the compiled path)."""
        return self.n_cached is None

    def rope(self, rotary: Rotary, dtype: torch.dtype):
        key = ("rope", rotary.key, dtype)
        if key not in self._memo:
            self._memo[key] = rotary.cos_sin(self.position_ids, dtype)
        return self._memo[key]

    def memo(self, key, fn):
        """Compute ``fn()`` once per forward call and share it between layers."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    @property
    def all_keys_visible(self) -> bool:
        """One new token and no padding over a growing cache: every cached key is visible (full caches
        hold every earlier token, ring buffers hold exactly the window and sinks), so no mask is needed."""
        return self.q_len == 1 and self.key_padding is None

    def query_index(self, device) -> torch.Tensor:
        return torch.arange(self.n_cached, self.n_cached + self.q_len, device=device)

    def mask(self, key_index: torch.Tensor, window: int | None = None, sink: int = 0, force: bool = False) -> torch.Tensor | None:
        """Boolean attention mask ``[B|1, 1, q_len, n_keys]`` (True = may attend), or None for plain causal.

        ``key_index`` holds the absolute index (0-based token count) of every key column. A key is visible
        when it is not in the future, not padding and, with a ``window``, among the last ``window`` tokens
        (the query itself included) or among the first ``sink`` tokens. ``force`` returns the mask even
        where plain causal attention (None) would do.
        """
        n = key_index.shape[0]
        plain = window is None and self.key_padding is None and n == self.n_cached + self.q_len and (self.n_cached == 0 or self.q_len == 1)
        if plain and not force:
            return None
        if not force and window is None and self.key_padding is None and n == self.n_cached + self.q_len:
            # a chunk after earlier ones over a full cache (keys = every token in order): causal aligned to the
            # last key, which SDPA's flash kernel runs without a mask tensor (a prefill in chunks)
            return causal_lower_right(self.q_len, n)
        q = self.query_index(key_index.device)
        allowed = window_mask(q, key_index, window, sink)[None, None]
        if self.key_padding is not None:
            allowed = allowed & self.key_padding[:, key_index][:, None, None, :]
            # a padded query row would see nothing; let it see itself so the softmax stays finite
            allowed = allowed | (key_index[None, :] == q[:, None])[None, None]
        return allowed


def mask_tensor(mask) -> bool:
    """Whether ``mask`` is a boolean mask tensor (not None, nor a :func:`causal_lower_right` bias)."""
    return isinstance(mask, torch.Tensor) and not isinstance(mask, CausalBias)


def attend(q, k, v, mask, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention; K/V may have fewer heads than Q (grouped-query, or one latent
    head for MLA). ``mask`` None means plain causal, or one query at the end of the keys; a
    :func:`causal_lower_right` bias means causal aligned to the last key (a chunk after cached tokens).
    ``softcap``: scores become ``softcap * tanh(score / softcap)`` before the softmax (Gemma 2), computed eagerly."""
    causal = mask is None and q.shape[2] > 1 and q.shape[2] == k.shape[2]
    if softcap is not None:
        return attend_softcapped(q, k, v, mask, scale, softcap, causal)
    gqa = k.shape[1] != q.shape[1]
    if gqa and q.is_cuda and mask_tensor(mask):
        # SDPA's memory-efficient kernel takes a mask but not grouped K/V, and its math fallback would hold
        # [batch, heads, queries, keys] scores: give it K/V per query head instead (masks come with padding
        # or with a sliding layer's chunk, whose keys are few)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def attend_softcapped(q, k, v, mask, scale: float, softcap: float, causal: bool = False) -> torch.Tensor:
    """Attention with soft-capped scores, as transformers' eager attention computes it: ``q`` [B, H, T, D],
    ``k``/``v`` [B, Hk, S, D] (Hk divides H), ``mask`` boolean (True = may attend), broadcastable to
    [B, H, T, S], a :func:`causal_lower_right` bias, or None (``causal``: the last T keys are the queries)."""
    b, h, t, _ = q.shape
    hk, s = k.shape[1], k.shape[2]
    scores = torch.matmul(q.reshape(b, hk, h // hk * t, -1), k.transpose(-1, -2)).view(b, h, t, s).float() * scale
    scores = softcap * torch.tanh(scores / softcap)
    if isinstance(mask, CausalBias):
        mask, causal = None, True
    if mask is None and causal:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(p.reshape(b, hk, h // hk * t, s), v).view(b, h, t, -1)


def decode_softcapped(q, k, v, n_filled, valid, scale: float, softcap: float, v_dim: int | None = None) -> torch.Tensor:
    """:func:`decode_attention`'s contract (one query per row over a static cache of which ``n_filled``
    slots are written; ``v=None``: the values are the keys' first ``v_dim`` columns) with soft-capped scores."""
    keep = torch.arange(k.shape[2], device=k.device) < n_filled
    mask = keep[None, :] if valid is None else keep[None, :] & valid
    values = k[..., :v_dim] if v is None else v
    return attend_softcapped(q[:, :, None], k, values, mask[:, None, None, :], scale, softcap)[:, :, 0]


def decode(q, k, v, n_filled, valid, scale: float, v_dim: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One decode step over a static cache: :func:`decode_attention`, or its soft-capped form."""
    if softcap is not None:
        return decode_softcapped(q, k, v, n_filled, valid, scale, softcap, v_dim)
    return decode_attention(q, k, v, n_filled, valid, scale, v_dim=v_dim)


def attend_new(q, k, v, ctx: AttentionContext, window: int | None, sink: int, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Attention when the keys are exactly this call's tokens, starting at token 0 (training, or a
    prefill into an empty cache): flash causal, or the sliding-window kernel; a mask only for padding
    (soft-capped scores: always a mask, eagerly)."""
    if ctx.key_padding is None and softcap is None:
        if window is None:
            return attend(q, k, v, None, scale)
        return sliding_attention(q, k, v, window, sink, scale)
    if softcap is not None and ctx.key_padding is None and window is None:
        return attend(q, k, v, None, scale, softcap)
    return attend(q, k, v, ctx.mask(torch.arange(k.shape[2], device=k.device), window, sink, force=True), scale, softcap)


_CHUNK_FLEX = {"ok": True}  # False once the FlexAttention chunk path failed: the dense path from then on


def chunk_on_flex(q: torch.Tensor) -> bool:
    """Whether a sliding layer's prefill chunk over cached keys runs on FlexAttention (CUDA, unless
    ``ATTNEDIT_KERNELS=sdpa``, and until it once failed); elsewhere a dense mask."""
    return _CHUNK_FLEX["ok"] and _use_fast(q)


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message (its type's name when it has none), at most ``limit`` characters: what a
    one-line warning quotes of it."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def is_out_of_memory(e: BaseException) -> bool:
    """A device or host out-of-memory error: CUDA's ``OutOfMemoryError``, ``MemoryError``, or the
    ``RuntimeError`` torch's CPU allocator raises (``DefaultCPUAllocator: can't allocate memory``), raised itself or
    behind the error that reports it (a compiler's, whose compiled code ran out of memory). The remote code's copy
    of ``attnedit.errors.is_out_of_memory`` (it imports nothing of attnedit, which imports no higher layer from
    its errors module): the chunk fallback lets through exactly what the capacity search counts as not fitting."""
    seen = set()
    while e is not None and id(e) not in seen:  # also one wrapped by torch.compile (BackendCompilerFailed)
        seen.add(id(e))
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
            return True
        text = str(e)
        if isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text):
            return True
        e = getattr(e, "inner_exception", None) or e.__cause__
    return False


def attend_cached(q, keys, values, key_index, ctx: AttentionContext, window: int | None, sink: int, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Attention of this call's queries over a cache's keys (``key_index``: each key column's token): a sliding
    layer's prefill chunk of at least 128 unpadded tokens on FlexAttention with a block mask shared by every layer
    of the same window in this call (the window's blocks only, K/V grouped as cached); otherwise the masked or
    causal kernels of :func:`attend`."""
    t = q.shape[2]
    if (
        window is not None
        and softcap is None
        and ctx.key_padding is None
        and t >= CHUNK_FLEX_MIN_QUERIES
        and q.shape[-1] == values.shape[-1] >= 16
        and chunk_on_flex(q)
    ):
        n = key_index.shape[0]
        try:
            block_mask = ctx.memo(("chunk_block_mask", window, sink, t, n), lambda: chunk_block_mask(ctx.query_index(q.device), key_index, window, sink))
            return sliding_chunk_attention(q, keys, values, block_mask, scale)
        except Exception as e:  # noqa: BLE001 - a compiler failure: the dense path from here on (running out of memory is not one)
            if is_out_of_memory(e):
                raise
            print(f"attnedit: warning: FlexAttention failed on a prefill chunk ({type(e).__name__}: {first_line(e)}); using a dense mask", file=sys.stderr)
            _CHUNK_FLEX["ok"] = False
    mask = None if ctx.all_keys_visible else ctx.mask(key_index, window, sink)
    return attend(q, keys, values, mask, scale, softcap)


class CacheLayer:
    """One layer's slot in an :class:`AttnEditCache`. Subclasses store their own tensors.

    Growing layers (``static = False``) concatenate as tokens arrive; static layers allocate their
    tensors once for (batch, max length) and write new tokens in place at device-side positions.
    """

    static = False
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
                if self.static:  # keep the storage (a compiled step holds its address)
                    value.copy_(fn(value))
                else:
                    setattr(self, name, fn(value))

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def rows(self, start: int, end: int) -> CacheLayer:
        """This static layer over batch rows ``start:end``: the same object's fields with every tensor a view of
        its rows (writes land in this layer's storage)."""
        import copy

        view = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(view, name, value[start:end])
        return view

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.static:
            raise NotImplementedError("a static attnedit cache keeps its batch size; use a growing cache")
        self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.static:
            raise NotImplementedError("a static attnedit cache keeps its batch size; use a growing cache")
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        if self.static:  # positions live in the parent cache; stale slots are never read
            return
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, None)
        self.n_cached = 0


def static_buffer(shape, dtype, device) -> torch.Tensor:
    """A cache tensor allocated once; marked as a fixed address so CUDA graphs can write into it."""
    t = torch.zeros(shape, dtype=dtype, device=device)
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)
    return t


def head_scale(dim: int) -> float:
    return 1.0 / math.sqrt(dim)
