"""Initialising new attention weights: random (the paper's choice) or from the teacher's weights.

Teacher initialisation is approximate by nature and only a starting point for the distillation:

* GateSWA copies q/k/v/o (and QK-norm); the gate starts at ``gate_init`` everywhere and ``o_proj`` is
  divided by it, so the layer starts as the teacher's attention restricted to its window. With
  ``gate=none`` there is no gate and the copy is exact.
* MLA (TransMLA/MHA2MLA-style): the teacher's ``qk_rope_head_dim / 2`` highest-frequency RoPE pairs,
  which MLA's RoPE reproduces exactly (its base is ``theta ** (rope_dim / head_dim)``), become
  ``q_pe``/``k_pe`` (the shared ``k_pe`` is the mean over KV heads); the low-frequency pairs, which
  barely rotate over short distances, become ``q_nope``/``k_nope``; the
  keys' non-RoPE rows and the values are factored jointly, weighted by the layer's actual input
  statistics (activation-aware SVD), into ``kv_a_proj`` and ``kv_b_proj``. RMSNorms in the
  student's path (``kv_a_layernorm``, ``q_a_layernorm``) and a QK-norm in the teacher (Qwen3) are
  not linear: their average scale, measured on calibration inputs, is folded into the weights.
  (Pure weight algebra breaks here: TransMLA issue #22.)
* MLA with ``bias`` (the default for teachers with q/k/v biases, e.g. Qwen2) keeps them where the math
  is exact: the query bias on ``q_proj``; the RoPE rows of the key bias on ``kv_a_proj_with_mqa``
  (rotated with the key, as in the teacher); the value bias, which passes through the softmax-weighted
  sum unchanged, folded into ``o_proj``'s bias (``W_o b_v + b_o``). The non-RoPE part of the key bias
  adds ``q . b_k`` to every score of a query alike, which the softmax ignores: it is dropped exactly.
  Without ``bias`` the teacher's biases are dropped.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..targets import GateSWAAttention, MLAAttention, RMSNorm


@torch.no_grad()
def random_init(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
    if isinstance(module, GateSWAAttention) and module.g_proj is not None:
        module.g_proj.weight.zero_()


@torch.no_grad()
def set_gate(module: GateSWAAttention, gate_bias: float) -> None:
    """Open the gate at ``sigmoid(gate_bias)``; a layer with ``gate=none`` has no gate to set."""
    if module.g_proj is None:
        return
    module.g_proj.weight.zero_()
    module.g_proj.bias.fill_(gate_bias)


@torch.no_grad()
def gateswa_from_teacher(student: GateSWAAttention, teacher: nn.Module, gate_bias: float) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        src, dst = getattr(teacher, name, None), getattr(student, name, None)
        if dst is not None and src is not None:
            dst.load_state_dict(src.state_dict())
    if student.g_proj is not None:  # gate=none: the copy is exactly the teacher restricted to its window
        set_gate(student, gate_bias)
        student.o_proj.weight.div_(1.0 / (1.0 + math.exp(-gate_bias)))


def _cpu64(t: torch.Tensor) -> torch.Tensor:
    """Factorisations run on the CPU in float64, wherever the model lives."""
    return t.detach().to("cpu", torch.float64)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1).sqrt()


def _norm_scale(w: torch.Tensor, x: torch.Tensor, heads: int, norm: nn.Module | None) -> torch.Tensor:
    """Fold a per-head RMSNorm (QK-norm) into ``w`` ``[heads * d, hidden]`` using its mean scale on ``x``."""
    if norm is None:
        return w
    d = w.shape[0] // heads
    proj = (x @ w.T).view(-1, heads, d)
    inv = 1.0 / _rms(proj).mean(0).clamp_min(1e-6)  # [heads]
    g = _cpu64(norm.weight).view(1, d, 1)
    return (w.view(heads, d, -1) * g * inv.view(heads, 1, 1)).reshape_as(w)


def _aware_lowrank(m: torch.Tensor, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``m ≈ a @ b`` with ``b`` of ``rank`` rows, minimising the error on inputs ``x`` [n, hidden].

    With ``C = xᵀx/n = L Lᵀ`` the error is ``‖(m − ab) L‖``, so take the SVD of ``m L``:
    ``a = U_r √S_r`` and ``b = √S_r V_rᵀ L⁻¹``. Falls back to a plain SVD if ``C`` is singular.
    """
    cov = x.T @ x / x.shape[0]
    cov = cov + 1e-4 * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    try:
        chol = torch.linalg.cholesky(cov)
        u, s, vt = torch.linalg.svd(m @ chol, full_matrices=False)
        b = (vt[:rank] * s[:rank, None].sqrt()) @ torch.linalg.inv(chol)
    except RuntimeError:
        u, s, vt = torch.linalg.svd(m, full_matrices=False)
        b = vt[:rank] * s[:rank, None].sqrt()
    return u[:, :rank] * s[:rank].sqrt(), b


@torch.no_grad()
def mla_from_teacher(student: MLAAttention, teacher: nn.Module, spec: dict, x: torch.Tensor) -> None:
    """Initialise an MLA layer from the teacher's attention, using calibration inputs ``x`` [n, hidden]."""
    x = _cpu64(x)
    heads, kvh, d = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
    rope, nope, r = student.qk_rope_head_dim, student.qk_nope_head_dim, student.kv_lora_rank
    group = heads // kvh
    wq = _norm_scale(_cpu64(teacher.q_proj.weight), x, heads, getattr(teacher, "q_norm", None))
    wk = _norm_scale(_cpu64(teacher.k_proj.weight), x, kvh, getattr(teacher, "k_norm", None))
    wv = _cpu64(teacher.v_proj.weight)
    pairs = torch.arange(rope // 2)  # the highest frequencies: MLA's RoPE reproduces exactly these
    rope_dims = torch.cat([pairs, pairs + d // 2])
    mask = torch.ones(d, dtype=torch.bool)
    mask[rope_dims] = False
    nope_dims = mask.nonzero().flatten()
    wq = wq.view(heads, d, -1)
    q_rows = torch.cat([wq[:, nope_dims], wq[:, rope_dims]], dim=1).reshape(heads * (nope + rope), -1)
    wk = wk.view(kvh, d, -1)
    k_pe = wk[:, rope_dims].mean(0)  # [rope, hidden]
    wv = wv.view(kvh, d, -1)
    per_head = [torch.cat([wk[h // group, nope_dims], wv[h // group]], dim=0) for h in range(heads)]
    m = torch.cat(per_head, dim=0)  # [heads * (nope + d), hidden]
    a, b = _aware_lowrank(m, x, r)
    scale = _rms(x @ b.T).mean().clamp_min(1e-6)
    student.kv_a_proj_with_mqa.weight.copy_(torch.cat([b, k_pe], dim=0).to(student.kv_a_proj_with_mqa.weight))
    student.kv_a_layernorm.weight.fill_(float(scale))
    student.kv_b_proj.weight.copy_(a.to(student.kv_b_proj.weight))
    if student.q_lora_rank is None:
        student.q_proj.weight.copy_(q_rows.to(student.q_proj.weight))
    else:
        qa, qb = _aware_lowrank(q_rows, x, student.q_lora_rank)
        student.q_a_proj.weight.copy_(qb.to(student.q_a_proj.weight))
        student.q_a_layernorm.weight.fill_(float(_rms(x @ qb.T).mean().clamp_min(1e-6)))
        student.q_b_proj.weight.copy_(qa.to(student.q_b_proj.weight))
    student.o_proj.weight.copy_(teacher.o_proj.weight.to(student.o_proj.weight))
    if student.o_proj.bias is not None:
        _mla_biases(student, teacher, heads, kvh, d, nope_dims, rope_dims)


def _bias(module: nn.Module, size: int) -> torch.Tensor:
    b = getattr(module, "bias", None)
    return _cpu64(b) if b is not None else torch.zeros(size, dtype=torch.float64)


@torch.no_grad()
def _mla_biases(student: MLAAttention, teacher: nn.Module, heads: int, kvh: int, d: int, nope_dims, rope_dims) -> None:
    """Carry the teacher's q/k/v/o biases into a biased MLA layer (exact where the math allows)."""
    group = heads // kvh
    bq = _bias(teacher.q_proj, heads * d).view(heads, d)
    bk = _bias(teacher.k_proj, kvh * d).view(kvh, d)
    bv = _bias(teacher.v_proj, kvh * d).view(kvh, d)
    bo = _bias(teacher.o_proj, student.hidden_size)
    q_bias = torch.cat([bq[:, nope_dims], bq[:, rope_dims]], dim=1).reshape(-1)
    (student.q_proj if student.q_lora_rank is None else student.q_b_proj).bias.copy_(q_bias)
    kv_a = torch.zeros(student.kv_a_proj_with_mqa.out_features, dtype=torch.float64)
    kv_a[student.kv_lora_rank :] = bk[:, rope_dims].mean(0)  # the shared k_pe: the mean over KV heads, as its weights
    student.kv_a_proj_with_mqa.bias.copy_(kv_a)
    v_all = bv[torch.arange(heads) // group].reshape(-1)  # every query head reads its KV head's values
    student.o_proj.bias.copy_(_cpu64(teacher.o_proj.weight) @ v_all + bo)
