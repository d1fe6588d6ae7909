"""Attention kernels: decode over a static cache, and sliding-window prefill/training.

Remote code (torch + transformers only): Triton, which ships with CUDA builds of PyTorch, is used when
it imports and the tensors are on CUDA; everywhere else the same functions run through PyTorch's SDPA.

* :func:`decode_attention` - one query token per sequence against a preallocated cache of ``S`` slots
  of which the first ``n_filled`` are written (``n_filled`` is a device tensor, so a compiled decode
  step never reads it on the host). K/V may have fewer heads than Q (grouped-query; MLA's absorbed
  decode is the case of one latent head, the values being the first ``Dv`` columns of the keys) and are
  never expanded per query head. :func:`decode_kernel_choice` picks, by measurement, SDPA with a length
  mask or a split-K Triton kernel (a ``torch.library`` custom op, one opaque call for ``torch.compile``
  and CUDA graphs) for latents wider than SDPA's fused kernels take.
* :func:`sliding_attention` - causal attention restricted to a window (plus ``sink`` first tokens),
  for prefill and training. On CUDA it is FlexAttention with a block mask (blocks outside the band
  are skipped, never a T x T mask); elsewhere SDPA with a boolean mask.

``ATTNEDIT_KERNELS=sdpa`` forces the PyTorch paths everywhere (for comparisons).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F


def _fast_device(device) -> bool:
    return torch.device(device).type == "cuda" and os.environ.get("ATTNEDIT_KERNELS", "auto") != "sdpa"


def _use_fast(t: torch.Tensor) -> bool:
    return _fast_device(t.device)


# ------------------------------------------------------------------------------------------ decode


def decode_attention_sdpa(q, k, v, n_filled, valid, scale: float, v_dim: int | None = None) -> torch.Tensor:
    """Reference decode: ``q`` [B, Hq, Dk], ``k`` [B, Hk, S, Dk], ``v`` [B, Hk, S, Dv] -> [B, Hq, Dv].

    ``n_filled``: 0-dim integer tensor, slots ``0..n_filled-1`` hold keys; ``valid``: [B, S] bool
    (False = padding) or None. ``v=None`` means the values are the first ``v_dim`` columns of the keys
    (MLA's latent): SDPA then reads the keys as values too - one tensor, equal widths, the same fused
    kernel as a grouped-query cache - and the output keeps its first ``v_dim`` columns.
    """
    s = k.shape[2]
    keep = torch.arange(s, device=k.device) < n_filled
    mask = keep[None, :] if valid is None else keep[None, :] & valid
    values = k if v is None else v
    out = F.scaled_dot_product_attention(q[:, :, None], k, values, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=bool(k.shape[1] != q.shape[1]))[
        :, :, 0
    ]
    return out[..., :v_dim] if v is None else out


try:  # Triton ships with CUDA builds of PyTorch; without it the SDPA paths run
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _split_bounds(NF, sp, split_len):
        """The cache slots ``start..end-1`` split ``sp`` reads: its ``split_len`` slots, cut at the filled count ``NF``."""
        start = sp * split_len
        return start, tl.minimum(start + split_len, tl.load(NF).to(tl.int32))

    @triton.jit
    def _softmax_start(ROWS: tl.constexpr, DV: tl.constexpr):
        """The running softmax state of ``ROWS`` query rows before any key: max -inf, sum 0, output [ROWS, DV] 0."""
        return tl.full([ROWS], float("-inf"), tl.float32), tl.zeros([ROWS], tl.float32), tl.zeros([ROWS, DV], tl.float32)

    @triton.jit
    def _softmax_step(qk, v, m, l, acc, VALID, offs_n, nmask, scale, HAS_VALID: tl.constexpr, IEEE: tl.constexpr):
        """One block of keys of a split-K decode, folded into the running softmax state (flash decoding): the
        scores ``qk`` [rows, BLOCK_N] are scaled, keys past the filled slots (``nmask``) or marked padding in the
        row's ``VALID`` flags score -inf, then the running max ``m``, sum ``l`` and output ``acc`` [rows, Dv] take
        in the block's values ``v`` [BLOCK_N, Dv]. Returns the new ``(m, l, acc)``."""
        qk = qk * scale
        keep = nmask
        if HAS_VALID:
            keep = keep & (tl.load(VALID + offs_n, mask=nmask, other=0) != 0)
        qk = tl.where(keep[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(qk - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc

    @triton.jit
    def _decode_partial(
        Q, K, V, VALID, NF, PO, PM, PL,
        sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sval_b,
        scale, split_len, HK,
        G: tl.constexpr, G_PAD: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr,
        DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
        HAS_VALID: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        hk = tl.program_id(1)
        sp = tl.program_id(2)
        start, end = _split_bounds(NF, sp, split_len)
        offs_g = tl.arange(0, G_PAD)
        offs_dk = tl.arange(0, DK_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        gmask = offs_g < G
        q = tl.load(
            Q + b * sq_b + (hk * G + offs_g)[:, None] * sq_h + offs_dk[None, :],
            mask=gmask[:, None] & (offs_dk[None, :] < DK),
            other=0.0,
        )
        m, l, acc = _softmax_start(G_PAD, DV_PAD)
        for s in range(start, end, BLOCK_N):
            offs_n = s + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            k = tl.load(  # [BLOCK_N, DK]: rows of the cache, contiguous along the head dim
                K + b * sk_b + hk * sk_h + offs_n[:, None] * sk_n + offs_dk[None, :],
                mask=nmask[:, None] & (offs_dk[None, :] < DK),
                other=0.0,
            )
            v = tl.load(
                V + b * sv_b + hk * sv_h + offs_n[:, None] * sv_n + offs_dv[None, :],
                mask=nmask[:, None] & (offs_dv[None, :] < DV),
                other=0.0,
            )
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            m, l, acc = _softmax_step(qk, v, m, l, acc, VALID + b * sval_b, offs_n, nmask, scale, HAS_VALID, IEEE)
        row = (b * HK + hk) * NSPLIT + sp
        tl.store(PO + row * G_PAD * DV_PAD + offs_g[:, None] * DV_PAD + offs_dv[None, :], acc)
        tl.store(PM + row * G_PAD + offs_g, m)
        tl.store(PL + row * G_PAD + offs_g, l)


def _pow2(x: int, least: int = 16) -> int:
    return max(least, 1 << (max(1, x) - 1).bit_length())


def decode_attention_triton(q, k, v, n_filled, valid, scale: float) -> torch.Tensor:
    """Split-K flash decoding over the filled slots; partial softmax states are merged in PyTorch."""
    bsz, hq, dk = q.shape
    hk, s, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hk
    g_pad, dk_pad, dv_pad = _pow2(g), _pow2(dk), _pow2(dv)
    big = max(dk_pad, dv_pad) > 128
    block_n = 16 if big else 64
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    want = max(1, math.ceil(4 * sms / (bsz * hk)))
    split_len = max(block_n, math.ceil(math.ceil(s / want) / block_n) * block_n)
    nsplit = math.ceil(s / split_len)
    f32 = torch.float32
    po = torch.empty(bsz, hk, nsplit, g_pad, dv_pad, device=q.device, dtype=f32)
    pm = torch.empty(bsz, hk, nsplit, g_pad, device=q.device, dtype=f32)
    pl = torch.empty(bsz, hk, nsplit, g_pad, device=q.device, dtype=f32)
    q = q.to(k.dtype)
    if k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention: the last dimension of q, k and v must be contiguous")
    val = valid if valid is not None else q  # any tensor; unused when HAS_VALID is False
    _decode_partial[(bsz, hk, nsplit)](
        q, k, v, val, n_filled, po, pm, pl,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        valid.stride(0) if valid is not None else 0,
        scale, split_len, hk,
        G=g, G_PAD=g_pad, DK=dk, DK_PAD=dk_pad, DV=dv, DV_PAD=dv_pad, BLOCK_N=block_n, NSPLIT=nsplit,
        HAS_VALID=valid is not None, IEEE=k.dtype == torch.float32,
        num_warps=8 if big else 4, num_stages=1 if big else 3,
    )  # fmt: skip
    m_max = pm.amax(2, keepdim=True)
    w = torch.exp(pm - torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max))
    denom = (w * pl).sum(2).clamp_min(1e-30)
    out = (w[..., None] * po).sum(2) / denom[..., None]
    return out[:, :, :g, :dv].reshape(bsz, hq, dv).to(v.dtype)


_OP_NAME = "attnedit::decode_attention_v1"


def _decode_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_filled: torch.Tensor, valid: torch.Tensor | None, scale: float) -> torch.Tensor:
    return decode_attention_triton(q, k, v, n_filled, valid, scale)


def _register_decode_op():
    """The Triton decode as a torch.library custom op, registered once per process (a second copy of
    this module, e.g. remote code loaded from another checkpoint, reuses the first registration)."""
    ns, name = _OP_NAME.split("::")
    try:
        op = torch.library.custom_op(_OP_NAME, mutates_args=())(_decode_impl)
        op.register_fake(lambda q, k, v, n_filled, valid, scale: q.new_empty(q.shape[0], q.shape[1], v.shape[-1], dtype=v.dtype))
    except RuntimeError:
        pass
    return getattr(getattr(torch.ops, ns), name)


_DECODE_OP = _register_decode_op() if HAS_TRITON else None


def decode_kernel_choice(q: torch.Tensor, k: torch.Tensor) -> str:
    """Which decode implementation runs for these shapes. Measured on an H200 on 2026-11-25 (benchmarks/check_kernels.py,
    one layer, batch 64, 8k keys): SDPA with a length mask reads a grouped-query cache at 1.23x the HBM
    bound, the split-K Triton kernel at 3.7x; for a latent wider than 256 SDPA has no fused kernel (560x)
    and the Triton kernel runs (13x). ``ATTNEDIT_DECODE=triton|sdpa`` overrides the choice."""
    forced = os.environ.get("ATTNEDIT_DECODE", "auto")
    if not _use_fast(q) or not HAS_TRITON or forced == "sdpa":
        return "sdpa"
    if forced == "triton":
        return "triton"
    return "triton" if k.shape[-1] > 256 else "sdpa"


def decode_attention(q, k, v, n_filled, valid, scale: float, v_dim: int | None = None) -> torch.Tensor:
    """One query per sequence over a static cache: [B, Hq, Dk] -> [B, Hq, Dv]. ``v=None``: the values are
    the first ``v_dim`` columns of ``k`` (MLA's latent cache, read once)."""
    if decode_kernel_choice(q, k) == "triton":
        return _DECODE_OP(q, k, k[..., :v_dim] if v is None else v, n_filled, valid, scale)
    return decode_attention_sdpa(q, k, v, n_filled, valid, scale, v_dim)


# ------------------------------------------------------------------------------------ MLA decode

if HAS_TRITON:

    @triton.jit
    def _mla_decode_partial(
        Q, LAT, VALID, NF, OUT, PO, PM, PL,
        sq_b, sq_h, sl_b, sl_n, sval_b, so_b, so_h,
        scale, split_len, H, nsplit,
        R: tl.constexpr, R_PAD: tl.constexpr, P: tl.constexpr, P_PAD: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, HT: tl.constexpr,
        HAS_VALID: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One (sequence, tile of heads, split of the cache): scores over the latent ``[c_kv | k_pe]`` read
        once as ``q_c . c_kv + q_p . k_pe``, values = ``c_kv`` (the same tile, already loaded)."""
        b = tl.program_id(0)
        ht = tl.program_id(1)
        sp = tl.program_id(2)
        start, end = _split_bounds(NF, sp, split_len)
        offs_h = ht * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, R_PAD)
        offs_p = tl.arange(0, P_PAD)
        hmask = offs_h < H
        q_row = Q + b * sq_b + offs_h[:, None] * sq_h
        q_c = tl.load(q_row + offs_r[None, :], mask=hmask[:, None] & (offs_r[None, :] < R), other=0.0)
        q_p = tl.load(q_row + R + offs_p[None, :], mask=hmask[:, None] & (offs_p[None, :] < P), other=0.0)
        m, l, acc = _softmax_start(BLOCK_H, R_PAD)
        for s in range(start, end, BLOCK_N):
            offs_n = s + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            row = LAT + b * sl_b + offs_n[:, None] * sl_n
            c = tl.load(row + offs_r[None, :], mask=nmask[:, None] & (offs_r[None, :] < R), other=0.0)  # [N, R]
            kp = tl.load(row + R + offs_p[None, :], mask=nmask[:, None] & (offs_p[None, :] < P), other=0.0)
            if IEEE:
                qk = tl.dot(q_c, tl.trans(c), input_precision="ieee") + tl.dot(q_p, tl.trans(kp), input_precision="ieee")
            else:
                qk = tl.dot(q_c, tl.trans(c)) + tl.dot(q_p, tl.trans(kp))
            m, l, acc = _softmax_step(qk, c, m, l, acc, VALID + b * sval_b, offs_n, nmask, scale, HAS_VALID, IEEE)
        if DIRECT:  # the whole cache in one program: write the output itself
            out = acc / tl.maximum(l, 1e-30)[:, None]
            ptr = OUT + b * so_b + offs_h[:, None] * so_h + offs_r[None, :]
            tl.store(ptr, out.to(OUT.dtype.element_ty), mask=hmask[:, None] & (offs_r[None, :] < R))
        else:
            row = (b * HT + ht) * nsplit + sp
            tl.store(PO + row * BLOCK_H * R_PAD + tl.arange(0, BLOCK_H)[:, None] * R_PAD + offs_r[None, :], acc)
            tl.store(PM + row * BLOCK_H + tl.arange(0, BLOCK_H), m)
            tl.store(PL + row * BLOCK_H + tl.arange(0, BLOCK_H), l)

    @triton.jit
    def _mla_decode_combine(
        PO, PM, PL, OUT, so_b, so_h, H, nsplit,
        R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_H: tl.constexpr, HT: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        """Merge the splits' partial softmax states of one (sequence, head, block of latent columns): the largest
        running max, then the rescaled sums. Splits are read ``BLOCK_S`` at a time as one wide load, not one after
        another: a single sequence's cache is split up to a hundred ways, and a serial walk's load latencies would
        cost more than the partial kernel itself."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        rb = tl.program_id(2)
        ht = h // BLOCK_H
        hh = h % BLOCK_H
        base = (b * HT + ht) * nsplit
        offs_s = tl.arange(0, BLOCK_S)
        m_blk = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for s0 in range(0, nsplit, BLOCK_S):
            smask = s0 + offs_s < nsplit
            m_blk = tl.maximum(m_blk, tl.load(PM + (base + s0 + offs_s) * BLOCK_H + hh, mask=smask, other=float("-inf")))
        m = tl.max(m_blk, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_R], tl.float32)
        den = tl.zeros([BLOCK_S], tl.float32)
        for s0 in range(0, nsplit, BLOCK_S):
            smask = s0 + offs_s < nsplit
            rows = (base + s0 + offs_s) * BLOCK_H + hh
            ws = tl.exp(tl.load(PM + rows, mask=smask, other=float("-inf")) - m_safe)  # 0 for a split with no key
            den += ws * tl.load(PL + rows, mask=smask, other=0.0)
            po = tl.load(PO + rows[:, None] * R_PAD + offs_r[None, :], mask=smask[:, None], other=0.0)
            acc += tl.sum(ws[:, None] * po, axis=0)
        out = acc / tl.maximum(tl.sum(den, axis=0), 1e-30)
        tl.store(OUT + b * so_b + h * so_h + offs_r, out.to(OUT.dtype.element_ty), mask=offs_r < R)


def mla_decode_plan(batch: int, heads: int, slots: int, rank: int, rope: int, sms: int = 132, split_len: int | None = None) -> dict:
    """Launch shape of :func:`mla_decode_triton` (a pure function of the shapes, tested on CPU).

    Heads go in tiles of ``block_h`` rows (at least 16, the matrix units' smallest M; 64 at most, as FlashMLA
    does); the cache is split over ``nsplit`` programs per tile so that about two programs run per SM, but
    never into splits so short that their partial states (``block_h x rank`` floats each, written and read
    once more by the merge) would cost more than an eighth of the latent bytes the split reads. ``split_len``
    (a multiple of 64) replaces that choice, for benchmarks that measure it."""
    r_pad, p_pad = _pow2(rank), _pow2(rope)
    block_h = min(64, _pow2(heads))
    tiles = -(-heads // block_h)
    block_n = 32 if r_pad >= 512 else 64
    partial_bytes = block_h * r_pad * 4
    unit = 64  # splits are whole multiples of every key block the GPU's tuning may pick
    min_split = max(unit, math.ceil(8 * partial_bytes / ((rank + rope) * 2) / unit) * unit)
    want = max(1, math.ceil(2 * sms / (batch * tiles)))
    if split_len is None:
        split_len = max(min_split, math.ceil(math.ceil(slots / want) / unit) * unit)
    elif split_len <= 0 or split_len % unit:
        raise ValueError(f"mla_decode_plan: split_len must be a positive multiple of {unit}, got {split_len}")
    nsplit = max(1, math.ceil(slots / split_len))
    return {"r_pad": r_pad, "p_pad": p_pad, "block_h": block_h, "tiles": tiles, "block_n": block_n,
            "split_len": split_len, "nsplit": nsplit}  # fmt: skip


def mla_decode_triton(q, latent, n_filled, valid, scale: float, rank: int, split_len: int | None = None) -> torch.Tensor:
    """Absorbed MLA decode: ``q`` [B, H, rank + rope] against the latent cache ``latent`` [B, S, rank + rope]
    (one KV head, values = its first ``rank`` columns) -> [B, H, rank]. Each latent row is read once per
    tile of heads; splits over the cache are merged by a second small kernel. ``split_len``: see
    :func:`mla_decode_plan` (None: the plan's choice)."""
    bsz, heads, width = q.shape
    rope, slots = width - rank, latent.shape[1]
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    plan = mla_decode_plan(bsz, heads, slots, rank, rope, sms, split_len)
    q = q.to(latent.dtype)
    if latent.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("mla_decode: the last dimension of q and the latent cache must be contiguous")
    out = torch.empty(bsz, heads, rank, device=q.device, dtype=latent.dtype)
    nsplit, block_h, tiles, r_pad = plan["nsplit"], plan["block_h"], plan["tiles"], plan["r_pad"]
    f32 = torch.float32
    shape = (bsz, tiles, nsplit, block_h) if nsplit > 1 else (1,)
    po = torch.empty(*shape, r_pad, device=q.device, dtype=f32) if nsplit > 1 else out
    pm = torch.empty(shape, device=q.device, dtype=f32) if nsplit > 1 else out
    pl = torch.empty(shape, device=q.device, dtype=f32) if nsplit > 1 else out
    val = valid if valid is not None else q
    wide = r_pad >= 512
    args = (
        q, latent, val, n_filled, out, po, pm, pl,
        q.stride(0), q.stride(1), latent.stride(0), latent.stride(1),
        valid.stride(0) if valid is not None else 0, out.stride(0), out.stride(1),
        scale, plan["split_len"], heads, nsplit,
    )  # fmt: skip
    consts = dict(R=rank, R_PAD=r_pad, P=rope, P_PAD=plan["p_pad"], BLOCK_H=block_h, DIRECT=nsplit == 1, HT=tiles,
                  HAS_VALID=valid is not None, IEEE=latent.dtype == torch.float32)  # fmt: skip
    if q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":  # split_len is a multiple of every tried BLOCK_N
        _mla_decode_partial_tuned[(bsz, tiles, nsplit)](*args, **consts)
    else:
        _mla_decode_partial[(bsz, tiles, nsplit)](*args, **consts, BLOCK_N=plan["block_n"], num_warps=8 if wide else 4, num_stages=2)
    if nsplit > 1:
        block_r = min(r_pad, 128)  # [BLOCK_S, BLOCK_R] float32 partial outputs a step: 16 KiB at most
        _mla_decode_combine[(bsz, heads, r_pad // block_r)](
            po, pm, pl, out, out.stride(0), out.stride(1), heads, nsplit,
            R=rank, R_PAD=r_pad, BLOCK_H=block_h, HT=tiles, BLOCK_S=min(32, _pow2(nsplit, least=2)), BLOCK_R=block_r, num_warps=4,
        )  # fmt: skip
    return out


if HAS_TRITON:
    # on a GPU the per-program tiling and pipelining are measured once per shape class: latent width, heads per
    # tile, split or not, padding or not; not per batch or length, so a new batch size costs no new tuning (the
    # interpreter keeps the plan's fixed choice)
    _MLA_CONFIGS = [
        triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st)
        for n in (16, 32, 64) for w in (4, 8) for st in (1, 2, 3)
    ]  # fmt: skip
    _mla_decode_partial_tuned = triton.autotune(_MLA_CONFIGS, key=["R_PAD", "P_PAD", "BLOCK_H", "DIRECT", "HAS_VALID"])(_mla_decode_partial)


_MLA_OP_NAME = "attnedit::mla_decode_v1"


def _mla_impl(q: torch.Tensor, latent: torch.Tensor, n_filled: torch.Tensor, valid: torch.Tensor | None, scale: float, rank: int) -> torch.Tensor:
    return mla_decode_triton(q, latent, n_filled, valid, scale, rank)


def _register_mla_op():
    ns, name = _MLA_OP_NAME.split("::")
    try:
        op = torch.library.custom_op(_MLA_OP_NAME, mutates_args=())(_mla_impl)
        op.register_fake(lambda q, latent, n_filled, valid, scale, rank: q.new_empty(q.shape[0], q.shape[1], rank, dtype=latent.dtype))
    except RuntimeError:
        pass
    return getattr(getattr(torch.ops, ns), name)


_MLA_OP = _register_mla_op() if HAS_TRITON else None


def mla_decode_attention(q, latent, n_filled, valid, scale: float, rank: int) -> torch.Tensor:
    """One query per sequence and head over MLA's static latent cache: ``q`` [B, H, rank + rope] (the absorbed
    query, ``[W_uk q_nope | q_pe]``), ``latent`` [B, S, rank + rope] -> [B, H, rank] (to be multiplied by
    ``W_uv``). On CUDA the Triton kernel (``ATTNEDIT_DECODE=sdpa`` forces the reference), elsewhere SDPA."""
    if _use_fast(q) and HAS_TRITON and os.environ.get("ATTNEDIT_DECODE", "auto") != "sdpa":
        return _MLA_OP(q, latent, n_filled, valid, scale, rank)
    return decode_attention_sdpa(q, latent[:, None], None, n_filled, valid, scale, v_dim=rank)


# ------------------------------------------------------------------------------- sliding prefill


def visible(q: torch.Tensor, k: torch.Tensor, window: int, sink: int) -> torch.Tensor:
    """Whether the key at token ``k`` is visible to the query at token ``q`` in a sliding layer: not in the future,
    and within ``window`` tokens (the query's own included) or among the first ``sink``."""
    return (k <= q) & ((q - k < window) | (k < sink))


def window_mask(q_index: torch.Tensor, k_index: torch.Tensor, window: int | None, sink: int) -> torch.Tensor:
    """[Tq, Tk] bool: key visible to query (causal, within ``window`` tokens or among the first ``sink``)."""
    q, k = q_index[:, None], k_index[None, :]
    return k <= q if window is None else visible(q, k, window, sink)


_BLOCK_MASKS: dict = {}
_FLEX = None


def _flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        # automatic dynamic shapes: a second prompt shape recompiles once with symbolic sizes instead of
        # once per shape (and never runs into the recompile limit, past which flex would run unfused)
        _FLEX = torch.compile(flex_attention)
    return _FLEX


def sliding_block_mask(t: int, window: int, sink: int, device):
    """FlexAttention's block mask for causal attention over ``t`` tokens within ``window`` tokens or among the first
    ``sink``, built once per shape and device. While ``torch.compile`` traces, the cache is read and never written
    (the mask is then built inside the graph): a write inside a traced gradient checkpoint is a side effect dynamo
    refuses, and the refusal runs the checkpointed layer eagerly, where FlexAttention is unfused and holds
    ``[T, T]`` scores. :func:`prepare_sliding` fills the cache outside any trace."""
    key = (t, window, sink, str(device))
    mask = _BLOCK_MASKS.get(key)
    if mask is None:
        from torch.nn.attention.flex_attention import create_block_mask

        def mod(b, h, q, k):
            return visible(q, k, window, sink)

        mask = create_block_mask(mod, None, None, t, t, device=device)
        if not torch.compiler.is_compiling():
            if len(_BLOCK_MASKS) > 32:
                _BLOCK_MASKS.clear()
            _BLOCK_MASKS[key] = mask
    return mask


def prepare_sliding(t: int, windows, device) -> None:
    """Build what :func:`sliding_attention` looks up for ``t`` tokens with each ``(window, sink)`` of ``windows``
    (the compiled FlexAttention and its block masks) before the layers run, so that a layer traced by
    ``torch.compile`` (under gradient checkpointing too) finds them and changes no state. A no-op off CUDA."""
    if torch.compiler.is_compiling() or not _fast_device(device):
        return
    _flex()
    for window, sink in windows:
        if window < t:
            sliding_block_mask(t, window, sink, device)


CHUNK_FLEX_MIN_QUERIES = 128  # FlexAttention's block: below it a chunk's dense mask is small, and building a block mask costs more


def chunk_block_mask(query_index: torch.Tensor, key_index: torch.Tensor, window: int, sink: int):
    """FlexAttention's block mask for a prefill chunk over a sliding layer's cache: query ``i`` is the token at
    ``query_index[i]``, key column ``j`` the token at ``key_index[j]`` (the ring buffer's tokens in slot order, then
    the chunk's); a key is visible when it is not in the future and within ``window`` tokens or among the first
    ``sink``. The positions are read from the tensors, so one compiled kernel serves every chunk of a shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mod(b, h, q, k):
        return visible(query_index[q], key_index[k], window, sink)

    cuda = query_index.is_cuda
    return create_block_mask(mod, None, None, query_index.shape[0], key_index.shape[0], device=query_index.device, _compile=cuda)


def sliding_chunk_attention(q, k, v, block_mask, scale: float) -> torch.Tensor:
    """Attention of a prefill chunk over a sliding layer's cached keys (:func:`chunk_block_mask`): FlexAttention
    computes only the blocks the window and the sinks reach and reads grouped K/V as they are, where a dense mask
    would score every cached key for every query (9x the window's work for an 8k chunk after a 1k window) and
    copy K/V per query head. ``q`` [B, Hq, T, D], ``k``/``v`` [B, Hk, S, D] -> [B, Hq, T, D]. Compiled on CUDA,
    eager elsewhere (the reference the tests compare)."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = _flex() if q.is_cuda else flex_attention
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def sliding_attention(q, k, v, window: int, sink: int, scale: float) -> torch.Tensor:
    """Causal self-attention over one unpadded chunk starting at token 0, restricted to the window.

    ``q`` [B, Hq, T, D], ``k``/``v`` [B, Hk, T, D] -> [B, Hq, T, D].
    """
    t = q.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if window >= t:  # the window covers everything: plain causal (flash kernel)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if _use_fast(q) and q.shape[-1] == v.shape[-1] and q.shape[-1] >= 16:
        return _flex()(q, k, v, block_mask=sliding_block_mask(t, window, sink, q.device), scale=scale, enable_gqa=gqa)
    idx = torch.arange(t, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(idx, idx, window, sink), scale=scale, enable_gqa=gqa)
