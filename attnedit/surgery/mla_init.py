"""MLA from a teacher's attention, calibrated on the teacher's own activations (``init: teacher``).

One pass of the teacher over calibration text (the run's own training data in ``convert``) collects, per edited
layer, the second moments of the attention's input (:class:`LayerStats`). From them and the teacher's weights:

* **Queries and keys as linear maps.** Without QK-norm the teacher's ``q/k/v_proj`` (and biases) are linear and
  used as they are. With QK-norm (Qwen3) the normalised queries and keys are not linear in the input; their best
  linear fit on the calibration inputs (least squares) stands in for them. (Folding the norm's weight and a mean
  scale into the projection, or factoring the weights alone, is where algebraic converters break on Qwen3.)
* **RoPE.** MLA keeps ``qk_rope_head_dim / 2`` rotary frequency pairs (the teacher's highest, which MLA's RoPE
  reproduces exactly) in one key shared by all heads. Per pair, the keys of the teacher's KV heads are merged by
  the principal direction of their covariance weighted by how much the queries read each head (a complex
  rotation and scale per head and pair, which commutes with RoPE): ``k_g ~ u_g c``, the shared key is ``c`` and
  each query head's pair is multiplied by ``conj(u_g)``, exact when the heads' keys are proportional and the best
  one-dimensional merge otherwise (a plain mean over heads, as before, loses most of it). The other pairs rotate
  slowly and become ``q_nope``/``k_nope``.
* **The latent.** ``[k_nope; v]`` of every KV head is factored to ``kv_lora_rank`` jointly, minimising the error
  where it matters: keys weighted by the queries that read them (and the spread of the values the scores mix),
  values by ``o_proj`` (what each query head makes of them), inputs by their covariance. One SVD of the
  doubly weighted matrix gives the optimum of that objective.
* **Which tokens count** (``init_weighting``): every calibration token alike for the keys and values (``tokens``),
  or each by the square root of the attention the teacher's queries give it (``attention``: :func:`key_weights`),
  so that the keys and values that are read most are kept best. The queries' weights use every token alike.
* **Rank per layer** (``rank_allocation: auto``): the layers share the total latent width (``kv_lora_rank`` x
  layers, the cached bytes unchanged) by the same objective's spectra, each weighted by what its error costs the
  model (the KL when that layer alone is converted), so that layers that need rank get it.
* **The latent RMSNorm** (``kv_a_layernorm``, DeepSeek's) is not linear: its weight is set per channel to the
  scale that best undoes the normalisation on the calibration inputs.
* **Biases** (Qwen2) survive exactly where the math allows: the query's on ``q_proj``; the RoPE part of the key's
  on the shared key (merged as its weights); the value's folded into ``o_proj``'s bias; the rest of the key's is
  added to every score of a query alike, which the softmax ignores.

It is a starting point for the distillation, not a lossless conversion; its one-shot quality is measured
(``docs/results.md``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

F64 = torch.float64


@dataclass
class LayerStats:
    """Running second moments of one attention's input (``x``, after the layer's input norm), in float64:
    ``xx = sum x x^T``, ``sx = sum x``; with QK-norm also the cross moments with the normalised queries and keys;
    and a row sample of ``x`` (for the latent norm's scale)."""

    n: int = 0
    xx: torch.Tensor | None = None
    sx: torch.Tensor | None = None
    xq: torch.Tensor | None = None
    xk: torch.Tensor | None = None
    sq: torch.Tensor | None = None
    sk: torch.Tensor | None = None
    sample: list = field(default_factory=list)
    sampled: int = 0
    wxx: torch.Tensor | None = None  # the same moments with each token weighted by the attention it receives (key_weights)
    wsx: torch.Tensor | None = None
    wn: float = 0.0
    wn2: float = 0.0  # sum of squared weights: the weighted moments' effective token count is wn^2 / wn2

    def add(self, x: torch.Tensor, teacher_attn: nn.Module, spec: dict, keep: int = 4096, rotary=None, window: int | None = None) -> None:
        mass = None
        if rotary is not None and x.dim() == 3:  # with the teacher's RoPE: also the moments weighted by attention
            mass = key_weights(attention_mass(x.to(F64), teacher_attn, spec, rotary, window)).reshape(-1)
        x = x.reshape(-1, x.shape[-1]).to(F64)
        if mass is not None:
            if self.wxx is None:
                self.wxx = torch.zeros(x.shape[1], x.shape[1], dtype=F64, device=x.device)
                self.wsx = torch.zeros(x.shape[1], dtype=F64, device=x.device)
            self.wxx += (x * mass[:, None]).T @ x
            self.wsx += (x * mass[:, None]).sum(0)
            self.wn += float(mass.sum())
            self.wn2 += float(mass.pow(2).sum())
        if self.xx is None:
            self.xx = torch.zeros(x.shape[1], x.shape[1], dtype=F64, device=x.device)
            self.sx = torch.zeros(x.shape[1], dtype=F64, device=x.device)
        self.xx += x.T @ x
        self.sx += x.sum(0)
        self.n += x.shape[0]
        if spec.get("qk_norm"):
            q, k = normalised_qk(teacher_attn, x, spec)
            if self.xq is None:
                self.xq, self.xk = torch.zeros_like(x.T @ q), torch.zeros_like(x.T @ k)
                self.sq, self.sk = torch.zeros(q.shape[1], dtype=F64, device=x.device), torch.zeros(k.shape[1], dtype=F64, device=x.device)
            self.xq += x.T @ q
            self.xk += x.T @ k
            self.sq += q.sum(0)
            self.sk += k.sum(0)
        if self.sampled < keep:
            take = x[: keep - self.sampled]
            self.sample.append(take.to("cpu"))
            self.sampled += take.shape[0]


def _w(linear: nn.Module) -> torch.Tensor:
    return linear.weight.detach().to(F64)


def _b(linear: nn.Module, rows: int) -> torch.Tensor:
    b = getattr(linear, "bias", None)
    return b.detach().to(F64) if b is not None else torch.zeros(rows, dtype=F64, device=linear.weight.device)


@torch.no_grad()
def normalised_qk(attn: nn.Module, x: torch.Tensor, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's queries and keys after its QK-norm, before RoPE, ``[tokens, heads * head_dim]`` each. The norm
    is per head (Qwen3) or over the whole projection (``qk_norm: projection``, OLMo 2); Gemma's gain is
    ``norm_offset + weight``."""
    d = spec["head_dim"]
    out = []
    for proj, norm, heads in ((attn.q_proj, attn.q_norm, spec["num_heads"]), (attn.k_proj, attn.k_norm, spec["num_kv_heads"])):
        y = x @ _w(proj).to(x.device).T + _b(proj, heads * d).to(x.device)
        y = y.view(-1, 1, heads * d) if spec.get("qk_norm") == "projection" else y.view(-1, heads, d)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", spec.get("rms_norm_eps", 1e-6)))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
        gain = norm.weight.detach().to(F64).to(x.device) + spec.get("norm_offset", 0.0)
        out.append((y * gain).reshape(y.shape[0], heads * d))
    return out[0], out[1]


@torch.no_grad()
def attention_mass(x: torch.Tensor, attn: nn.Module, spec: dict, rotary, window: int | None = None) -> torch.Tensor:
    """``[batch, tokens]``: how much attention each token of a block receives from the block's queries, summed over
    the queries and averaged over the heads (a token no query reads gets 0; the first token, which most heads use as
    their sink, gets the most), scaled so that the block's mean is 1. The teacher's own attention, recomputed from
    the layer's input: its queries and keys (QK-norm included) with the layer's RoPE (``rotary``), its softmax scale
    and soft cap, causal, over its sliding ``window`` where the layer slides."""
    from ..targets.common import apply_rope

    b, t, _ = x.shape
    h, g, d = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
    flat = x.reshape(b * t, -1)
    if spec.get("qk_norm"):
        q, k = normalised_qk(attn, flat, spec)
    else:
        q = flat @ _w(attn.q_proj).to(x.device).T + _b(attn.q_proj, h * d).to(x.device)
        k = flat @ _w(attn.k_proj).to(x.device).T + _b(attn.k_proj, g * d).to(x.device)
    q = q.view(b, t, h, d).transpose(1, 2).float()
    k = k.view(b, t, g, d).transpose(1, 2).float()
    cos, sin = rotary.cos_sin(torch.arange(t, device=x.device), torch.float32)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(h // g, dim=1)
    scores = (q @ k.transpose(-1, -2)) * spec.get("scaling", d**-0.5)
    if spec.get("softcap"):
        scores = spec["softcap"] * torch.tanh(scores / spec["softcap"])
    pos = torch.arange(t, device=x.device)
    hidden = pos[None, :] > pos[:, None]  # the future
    if window:
        hidden |= pos[None, :] <= pos[:, None] - window  # out of the window (a query sees itself and window - 1 before)
    scores = scores.masked_fill(hidden, float("-inf"))
    mass = scores.softmax(-1).sum(-2).mean(1).to(F64)  # [b, t]
    return mass * (t / mass.sum(-1, keepdim=True))


def key_weights(mass: torch.Tensor) -> torch.Tensor:
    """The weight of each token in the keys' and values' factorisation: the square root of the attention it
    receives. To first order a key's and value's errors cost in proportion to their attention, but a key that is
    barely read can still take attention from the others when its score errs upwards; on SmolLM2 at 4k (CPU,
    ``benchmarks/mla_oneshot.py``) the square root started closer than both every token alike and the attention
    itself."""
    return mass.clamp_min(0).sqrt()


def _second_and_mean(stats: LayerStats, weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``E[x x^T]`` and ``E[x]`` over the calibration tokens; ``weighted``: over the tokens weighted by the attention
    they receive (where collected), else every token alike."""
    if weighted and stats.wxx is not None:
        return (stats.wxx / stats.wn).cpu(), (stats.wsx / stats.wn).cpu()
    return (stats.xx / stats.n).cpu(), (stats.sx / stats.n).cpu()


def _moments(stats: LayerStats, bias: bool, weighted: bool = False) -> torch.Tensor:
    """``E[x~ x~^T]`` with ``x~ = [x; 1]`` when the student has biases (the intercept column last); ``weighted``:
    over tokens weighted by the attention they receive (when collected)."""
    c, m = _second_and_mean(stats, weighted)
    if not bias:
        return c
    top = torch.cat([c, m[:, None]], 1)
    return torch.cat([top, torch.cat([m, torch.ones(1, dtype=F64)])[None]], 0)


def _shrinkage(n: int, dims: int) -> float:
    """Ridge of the input covariance, relative to its mean eigenvalue: negligible with many calibration tokens per
    dimension, strong with few (with fewer tokens than dimensions the whitening would invert noise)."""
    return max(1e-5, 0.1 * (dims / max(n, 1)) ** 2)


def _ridge(c: torch.Tensor, rel: float = 1e-5) -> torch.Tensor:
    return c + rel * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)


def _linear_maps(teacher_attn: nn.Module, spec: dict, stats: LayerStats, bias: bool):
    """The teacher's queries, keys and values as linear maps of ``x~``: ``[heads, d, D]``, ``[kv, d, D]`` x 2."""
    h, g, d = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]

    def exact(proj, rows):
        w = _w(proj).cpu()
        return torch.cat([w, _b(proj, rows).cpu()[:, None]], 1) if bias else w

    wv = exact(teacher_attn.v_proj, g * d)
    if spec.get("qk_norm") and stats.xq is not None:
        c = _moments(stats, bias)
        if bias:
            cross_q = torch.cat([stats.xq.cpu(), stats.sq.cpu()[None]], 0) / stats.n
            cross_k = torch.cat([stats.xk.cpu(), stats.sk.cpu()[None]], 0) / stats.n
        else:
            cross_q, cross_k = stats.xq.cpu() / stats.n, stats.xk.cpu() / stats.n
        inv = torch.linalg.inv(_ridge(c, 1e-6))
        wq, wk = (inv @ cross_q).T, (inv @ cross_k).T  # least squares: E[t x~^T] E[x~ x~^T]^-1
    else:
        wq, wk = exact(teacher_attn.q_proj, h * d), exact(teacher_attn.k_proj, g * d)
    return wq.view(h, d, -1), wk.view(g, d, -1), wv.view(g, d, -1)


def _psd_sqrt(m: torch.Tensor, floor: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix and its inverse, small eigenvalues floored (relative)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    vals = vals.clamp_min(floor * max(float(vals.max()), 1e-30))
    return (vecs * vals.sqrt()) @ vecs.T, (vecs / vals.sqrt()) @ vecs.T


@dataclass
class LayerFactors:
    """Everything needed to write one MLA layer at any latent rank."""

    q_rows: torch.Tensor  # [heads * (nope + rope), D]
    kpe_rows: torch.Tensor  # [rope, D]
    u: torch.Tensor  # [m, m] left singular vectors in the weighted space
    s: torch.Tensor  # singular values (descending)
    vt: torch.Tensor  # [m, D]
    left_inv: torch.Tensor  # inverse of the left weight
    right_inv: torch.Tensor  # inverse of the right weight (Cholesky factor of E[x~ x~^T])
    nope: int
    d: int
    heads: int
    kv_heads: int
    bias: bool

    def latent(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)``: ``[k_nope; v]`` of the KV heads ~ ``a @ b @ x~`` with ``b`` of ``rank`` rows."""
        r = min(rank, self.s.shape[0])
        root = self.s[:r].sqrt()
        a = self.left_inv @ (self.u[:, :r] * root)
        b = (root[:, None] * self.vt[:r]) @ self.right_inv
        if r < rank:  # more rank than the teacher's K/V have: the extra latent channels stay unused
            a = torch.cat([a, a.new_zeros(a.shape[0], rank - r)], 1)
            b = torch.cat([b, b.new_zeros(rank - r, b.shape[1])], 0)
        return a, b


def _rope_pairs(d: int, rope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher dims of MLA's RoPE pairs (half-split layout: pair j is dims j and j + d/2; the highest frequencies
    first) and the remaining (nope) dims, in order."""
    pairs = torch.arange(rope // 2)
    keep = torch.ones(d, dtype=torch.bool)
    keep[pairs] = False
    keep[pairs + d // 2] = False
    return pairs, keep.nonzero().flatten()


@torch.no_grad()
def factor_layer(
    teacher_attn: nn.Module, o_weight: torch.Tensor, spec: dict, stats: LayerStats, rope: int, bias: bool, key_weight: float = 1.0
) -> LayerFactors:
    """The weighted factorisation of one layer (see the module's docstring)."""
    h, g, d = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
    group = h // g
    wq, wk, wv = _linear_maps(teacher_attn, spec, stats, bias)
    c = _moments(stats, bias)  # every token is a query
    ck = _moments(stats, bias, weighted=True)  # keys and values: tokens weighted by the attention they receive
    n_keys = stats.wn**2 / stats.wn2 if stats.wxx is not None else stats.n  # their effective count
    pairs, nope_dims = _rope_pairs(d, rope)
    nope = nope_dims.numel()
    head_group = torch.arange(h) // group
    # --- RoPE: per pair, merge the KV heads' keys along their query-weighted principal direction
    q_re, q_im = wq[:, pairs], wq[:, pairs + d // 2]  # [h, rope/2, D]
    k_cx = torch.complex(wk[:, pairs], wk[:, pairs + d // 2])  # [g, rope/2, D]
    q_energy = (torch.einsum("hpd,de,hpe->hp", q_re, c, q_re) + torch.einsum("hpd,de,hpe->hp", q_im, c, q_im)).clamp_min(0)
    w = torch.zeros(g, rope // 2, dtype=F64).index_add_(0, head_group, q_energy) + 1e-12  # [g, pairs]
    cc = ck.to(torch.complex128)
    u = torch.zeros(g, rope // 2, dtype=torch.complex128)
    kpe = torch.zeros(rope // 2, wk.shape[-1], dtype=torch.complex128)
    for p in range(rope // 2):
        kp = k_cx[:, p]  # [g, D]
        cov = kp @ cc @ kp.conj().T  # E[k k^H], [g, g]
        sw = w[:, p].sqrt().to(torch.complex128)
        vals, vecs = torch.linalg.eigh(sw[:, None] * cov * sw[None, :])
        top = vecs[:, -1]
        a = top * sw
        kpe[p] = (a.conj()[:, None] * kp).sum(0)
        u[:, p] = top / sw
    kpe_rows = torch.cat([kpe.real, kpe.imag], 0)  # the student's half-split layout: re of every pair, then im
    uh = u[head_group].conj()  # [h, pairs]: each query head's pair times conj(u_g)
    qpe_re = uh.real[..., None] * q_re - uh.imag[..., None] * q_im
    qpe_im = uh.imag[..., None] * q_re + uh.real[..., None] * q_im
    q_rows = torch.cat([wq[:, nope_dims], qpe_re, qpe_im], 1).reshape(h * (nope + rope), -1)
    # --- the latent: [k_nope; v] of every KV head, keys weighted by their queries and values by o_proj. Their
    # biases stay out: k_nope's adds the same to every score of a query (the softmax ignores it), v's is folded
    # into o_proj's bias (write_mla); the intercept the factorisation fits is the inputs' mean's share.
    m = torch.cat([wk[:, nope_dims].reshape(g * nope, wk.shape[-1]), wv.reshape(g * d, -1)], 0)
    if bias:
        m[:, -1] = 0
    o = o_weight.detach().to(F64).cpu().view(-1, h, d)  # [hidden, h, d]
    second, mean = _second_and_mean(stats, weighted=True)
    cent = second - torch.outer(mean, mean)
    blocks = []
    for kv in range(g):
        heads = (head_group == kv).nonzero().flatten()
        wvx = wv[kv][:, : cent.shape[0]]
        cov_v = wvx @ cent @ wvx.T  # [d, d]
        kw = torch.zeros(nope, nope, dtype=F64)
        vw = torch.zeros(d, d, dtype=F64)
        for hh in heads:
            oh = o[:, hh]  # [hidden, d]
            spread = float(torch.trace(oh @ cov_v @ oh.T))
            qn = wq[hh, nope_dims]
            kw += spread * (qn @ c @ qn.T) / d
            vw += oh.T @ oh
        blocks.append((kw * key_weight, vw))
    roots = [_psd_sqrt(kw) for kw, _ in blocks if nope] + [_psd_sqrt(vw) for _, vw in blocks]
    left = torch.block_diag(*[s for s, _ in roots])
    left_inv = torch.block_diag(*[i for _, i in roots])
    chol = torch.linalg.cholesky(_ridge(ck, _shrinkage(int(n_keys), ck.shape[0])))
    uu, ss, vt = torch.linalg.svd(left @ m @ chol, full_matrices=False)
    return LayerFactors(q_rows, kpe_rows, uu, ss, vt, left_inv, torch.linalg.inv(chol), nope, d, h, g, bias)


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


def allocate_ranks(spectra: list[torch.Tensor], energies: list[float], total: int, step: int = 8, least: int = 8) -> list[int]:
    """Latent ranks per layer summing to ``total`` (multiples of ``step``, at least ``least``, at most what each
    layer's spectrum has, rounded up to ``step``): each further block of ``step`` goes where it removes the most
    error divided by that layer's ``energies`` entry (its error per unit of cost; greedy, optimal for decreasing
    spectra)."""
    n = len(spectra)
    caps = [max(least, math.ceil(s.numel() / step) * step) for s in spectra]
    ranks = [min(least, c) for c in caps]
    if sum(ranks) > total:
        raise ValueError(f"a total latent width of {total} cannot give every layer {least}")

    def gain(i: int) -> float:
        s = spectra[i]
        return float(s[ranks[i] : ranks[i] + step].pow(2).sum()) / max(energies[i], 1e-30)

    left = total - sum(ranks)
    while left >= step:
        open_ = [i for i in range(n) if ranks[i] + step <= caps[i]]
        if not open_:
            break
        best = max(open_, key=gain)
        ranks[best] += step
        left -= step
    while left > 0:  # a remainder smaller than a step goes to the first layers that can take it
        for i in range(n):
            if left and ranks[i] < caps[i]:
                ranks[i] += 1
                left -= 1
        if all(ranks[i] >= caps[i] for i in range(n)):
            break
    return ranks


@torch.no_grad()
def write_mla(student, teacher_attn: nn.Module, factors: LayerFactors, stats: LayerStats, spec: dict) -> None:
    """Set one MLA layer's weights from its factors at the layer's own ``kv_lora_rank``."""
    r, h, d = student.kv_lora_rank, factors.heads, factors.d
    a, b = factors.latent(r)
    bias = factors.bias
    x = torch.cat(stats.sample).to(F64)
    if r > 1:  # r - 1 channels of latent, one steady channel that keeps the RMSNorm's divisor still
        a, b = factors.latent(r - 1)
        xt = torch.cat([x, torch.ones(x.shape[0], 1, dtype=F64)], 1) if bias else x
        row = steady_row(stats, bias)
        b = torch.cat([b, _steady_scale(xt @ b.T, xt @ row) * row[None]], 0)
        a = torch.cat([a, a.new_zeros(a.shape[0], 1)], 1)

    def split(rows):  # weight and bias of rows over x~ = [x; 1]
        return (rows[:, :-1], rows[:, -1]) if bias else (rows, None)

    kv_a_w, kv_a_b = split(torch.cat([b, factors.kpe_rows], 0))
    student.kv_a_proj_with_mqa.weight.copy_(kv_a_w.to(student.kv_a_proj_with_mqa.weight))
    if student.kv_a_proj_with_mqa.bias is not None:
        student.kv_a_proj_with_mqa.bias.copy_(kv_a_b.to(student.kv_a_proj_with_mqa.bias))
    # the latent RMSNorm: per channel, the weight that best undoes the normalisation on calibration inputs
    lat = x @ kv_a_w[:r].T + (kv_a_b[:r] if kv_a_b is not None else 0)
    rho = lat.pow(2).mean(-1, keepdim=True).add(student.kv_a_layernorm.eps).sqrt()
    scale = (lat.pow(2) / rho).mean(0) / (lat.pow(2) / rho.pow(2)).mean(0).clamp_min(1e-30)
    weight = torch.where(scale > 0, scale, rho.mean())
    if r > 1:  # the steady channel's kv_b column is zero, so its weight is free: give its normed value the size of
        # the other channels', not the steady row's (about 1e3 larger), else the first optimiser steps on that
        # column add the large value to every key and value and training diverges
        normed = lat / rho
        others = (normed[:, :-1] * weight[:-1]).pow(2).mean().sqrt()
        weight[-1] = others / normed[:, -1].pow(2).mean().sqrt().clamp_min(1e-30)
    student.kv_a_layernorm.weight.copy_(weight.to(student.kv_a_layernorm.weight))
    # kv_b_proj: per query head its KV head's [k_nope; v] rows of the latent map
    g, nope = factors.kv_heads, factors.nope
    group = h // g
    rows = []
    for hh in range(h):
        kv = hh // group
        rows += [a[kv * nope : (kv + 1) * nope], a[g * nope + kv * d : g * nope + (kv + 1) * d]]
    student.kv_b_proj.weight.copy_(torch.cat(rows, 0).to(student.kv_b_proj.weight))
    q_w, q_b = split(factors.q_rows)
    if student.q_lora_rank is None:
        student.q_proj.weight.copy_(q_w.to(student.q_proj.weight))
        if student.q_proj.bias is not None:
            student.q_proj.bias.copy_(q_b.to(student.q_proj.bias))
    else:
        qa, qb = _aware_lowrank(q_w, x, student.q_lora_rank)
        student.q_a_proj.weight.copy_(qb.to(student.q_a_proj.weight))
        student.q_a_layernorm.weight.fill_(float((x @ qb.T).pow(2).mean(-1).sqrt().mean().clamp_min(1e-6)))
        student.q_b_proj.weight.copy_(qa.to(student.q_b_proj.weight))
        if student.q_b_proj.bias is not None:
            student.q_b_proj.bias.copy_(q_b.to(student.q_b_proj.bias))
    student.o_proj.weight.copy_(teacher_attn.o_proj.weight.to(student.o_proj.weight))
    if student.o_proj.bias is not None:  # the values' bias passes the softmax unchanged: fold it into o_proj
        bv = _b(teacher_attn.v_proj, g * d).cpu().view(g, d)
        v_all = bv[torch.arange(h) // group].reshape(-1)
        bo = _b(teacher_attn.o_proj, student.hidden_size).cpu()
        student.o_proj.bias.copy_((teacher_attn.o_proj.weight.detach().to(F64).cpu() @ v_all + bo).to(student.o_proj.bias))
    fold_query_scale(student, spec)


@torch.no_grad()
def fold_query_scale(student, spec: dict) -> None:
    """A teacher whose softmax scale is not ``head_dim ** -0.5`` (Gemma's ``query_pre_attn_scalar``, Granite's
    ``attention_multiplier``; ``spec["scaling"]``): MLA keeps DeepSeek's ``1 / sqrt(qk_head_dim)`` (stock exports
    stay exact) and the ratio goes into the query's last projection, which scales every score alike."""
    if spec.get("scaling") is None:
        return
    ratio = spec["scaling"] * math.sqrt(student.qk_head_dim)
    last = student.q_proj if student.q_lora_rank is None else student.q_b_proj
    last.weight.mul_(ratio)
    if last.bias is not None:
        last.bias.mul_(ratio)


def teacher_rope_and_window(config, family, spec: dict, layer: int):
    """The teacher's RoPE (a ``Rotary`` over its head dim, with this layer's parameters) and sliding window (None:
    full attention) at ``layer``, as its family defines them: what :func:`attention_mass` needs."""
    from ..targets.common import Rotary

    rotary = Rotary(spec["head_dim"], {**config.to_dict(), "rope_parameters": family.rope(config, layer)})
    return rotary, family.window(config, layer)


@torch.no_grad()
def collect_stats(teacher, layers: list[int], ids: torch.Tensor, batch: int = 4, weighting: str = "tokens") -> dict[int, LayerStats]:
    """One pass of the teacher over ``ids`` (in batches), accumulating :class:`LayerStats` for each listed layer;
    ``weighting='attention'`` also the moments over tokens weighted by the attention they receive, which the keys'
    and values' factorisation then uses (:func:`attention_mass`)."""
    from ..families import family_for
    from ..families.hooks import StopForward, watch

    family = family_for(teacher.config)
    spec = family.attention_spec(teacher.config)
    rotary, window = {}, {}  # per layer, to recompute the teacher's attention (weighting='attention' only)
    if weighting == "attention":
        for i in layers:
            rotary[i], window[i] = teacher_rope_and_window(teacher.config, family, spec, i)
    stats = {i: LayerStats() for i in layers}
    attns = {i: family.attention(teacher, i) for i in layers}
    projections = {i: family.projections(teacher, i) for i in layers}  # q/k/v apart, whatever the family fuses
    last = max(layers)

    def on_attention(i, x):
        stats[i].add(x.detach(), projections[i], spec, rotary=rotary.get(i), window=window.get(i))
        if i == last:
            raise StopForward  # the layers above the last edited one are not needed

    device = next(teacher.parameters()).device
    with watch(attns, on_input=on_attention):
        for s in range(0, ids.shape[0], batch):
            with contextlib.suppress(StopForward):
                teacher(input_ids=ids[s : s + batch].to(device))
    return stats


def plan_mla_init(
    teacher, stats: dict[int, LayerStats], layer_attention: list[dict], allocation: str, ids: torch.Tensor | None = None, key_weight: float = 1.0
):
    """Each edited layer's factors, and (``allocation='auto'``) the latent ranks that share the layers' total.
    Returns ``{layer: LayerFactors}`` and ``{layer: rank}``.

    ``auto`` weighs each layer's spectrum by what its error costs the model: every layer is converted alone at
    its given rank and the KL of the teacher's next-token distributions over ``ids`` measured, so a layer's
    further singular values count in KL (to first order, its KL scales with its factorisation error)."""
    from ..families import family_for

    family = family_for(teacher.config)
    spec = family.attention_spec(teacher.config)
    factors, ranks = {}, {}
    for i, st in stats.items():
        layer = layer_attention[i]
        attn = family.projections(teacher, i)
        factors[i] = factor_layer(attn, attn.o_proj.weight, spec, st, layer["qk_rope_head_dim"], bool(layer.get("bias")), key_weight)
        ranks[i] = layer["kv_lora_rank"]
    if allocation == "auto":
        order = sorted(stats)
        total = sum(ranks[i] for i in order)
        kl = layer_sensitivity(teacher, stats, factors, layer_attention, ids)
        energies = []
        for i in order:  # the error energy left at the given rank: KL per unit of it
            left = float(factors[i].s[ranks[i] :].pow(2).sum())
            energies.append(max(left, 1e-30) / max(kl[i], 1e-12))
        least = min(8, min(ranks.values()))
        found = allocate_ranks([factors[i].s for i in order], energies, total, step=8, least=least)
        ranks = dict(zip(order, found))
    return factors, ranks


@torch.no_grad()
def layer_sensitivity(teacher, stats: dict[int, LayerStats], factors: dict, layer_attention: list[dict], ids: torch.Tensor) -> dict[int, float]:
    """KL(teacher || teacher with only layer i converted to MLA at its given rank), per edited layer, on ``ids``."""
    import torch.nn.functional as F

    from ..families import family_for
    from ..targets.modeling_attnedit import TeacherLayerCall, attention_class, build_attention, teacher_called
    from .edit import teacher_on_attnedit

    family = family_for(teacher.config)
    spec = family.attention_spec(teacher.config)
    engine = teacher_on_attnedit(teacher)
    device, dtype = next(teacher.parameters()).device, next(teacher.parameters()).dtype
    ids = ids[: max(1, min(len(ids), 2))].to(device)
    ref = F.log_softmax(engine(input_ids=ids).logits.float(), -1)
    out = {}
    for i in sorted(stats):
        original = engine.model.layers[i].self_attn
        cls = attention_class("mla")
        cls = teacher_called(cls) if isinstance(original, TeacherLayerCall) else cls  # called by the teacher's own layer
        mla = build_attention(layer_attention[i], engine.config.teacher_attention, engine.config.base_config, i, cls).to(device, dtype)
        write_mla(mla, family.projections(teacher, i), factors[i], stats[i], spec)
        engine.model.layers[i].self_attn = mla
        try:
            logp = F.log_softmax(engine(input_ids=ids).logits.float(), -1)
        finally:
            engine.model.layers[i].self_attn = original
        out[i] = float((ref.exp() * (ref - logp)).sum(-1).mean())
    return out


def steady_row(stats: LayerStats, bias: bool) -> torch.Tensor:
    """A row over ``x~`` whose value is (nearly) 1 for every input: the intercept when there is one, else the least
    squares fit of the constant 1 (the input of a norm layer carries such a direction: its error is a few per cent
    on the teachers' own activations)."""
    c = _moments(stats, bias)
    if bias:
        return torch.cat([torch.zeros(c.shape[0] - 1, dtype=F64), torch.ones(1, dtype=F64)])
    return torch.linalg.solve(_ridge(c, 1e-6), (stats.sx / stats.n).cpu())


def _steady_scale(lat: torch.Tensor, one: torch.Tensor) -> float:
    """The steady channel's size: of multiples of the latent's own RMS, the one that keeps the RMS of
    ``[lat, size * one]`` closest to constant on the sample, judged by its worst tokens (attention sinks, whose
    latents can be far larger than the rest, matter most)."""
    base = float(lat.pow(2).sum(1).mean().sqrt())
    best, best_dev = base, float("inf")
    for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024):
        rms = torch.cat([lat, (k * base * one)[:, None]], 1).pow(2).mean(1).sqrt()
        dev = float((rms / rms.median()).log().abs().max())
        if dev < best_dev:
            best, best_dev = k * base, dev
    return best
