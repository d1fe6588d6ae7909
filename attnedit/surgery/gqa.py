"""GQA head reduction, a target written through the target API (``api.py``) in this one module: the teacher's
attention with its key/value heads merged into fewer (attention class: ``attnedit/targets/gqa.py``).

Initialisation from the teacher aligns the heads of each group before averaging them, as MHA2GQA does (align
attention heads before merging them): a merged head is the mean of its group's heads once each is mapped
onto the group's common frame by a transform the rest of the layer absorbs exactly.

* Values: an orthogonal map ``Q_g`` per KV head (orthogonal Procrustes on the head's values over calibration
  text): ``W_v,g <- Q_g^T W_v,g`` and the ``o_proj`` columns of every query head reading that KV head
  ``<- O_h Q_g``, which leaves the layer's output unchanged.
* Keys: one 2-D rotation per RoPE frequency pair (the same closed-form Procrustes, restricted to the rotations
  of that pair's plane, which commute with RoPE): ``W_k,g`` and the ``q_proj`` rows of every query head
  reading it rotate alike, so every score is unchanged. Not with QK-norm (Qwen3, Gemma 3, OLMo 2): a norm
  between the projection and the rotation does not commute with it, so those teachers' keys are averaged
  as they are (their values are still aligned).

The reference frame of a group is its first head, then the mean of the aligned heads (two passes). Plain
averaging (``align=false``) is what you get without these maps. With ``num_key_value_heads`` equal to the
teacher's, every transform is the identity and the model is the teacher exactly.

A converted model is the teacher's own architecture with a smaller ``num_key_value_heads``:
``attnedit export --format stock`` writes it as a stock checkpoint of the teacher's model type (Llama, Qwen2,
Qwen3, Mistral, Gemma, ...), loaded by transformers, vLLM and SGLang without remote code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import AttnEditError
from ..targets import GQAAttention
from .api import LayerPlan, Target, dense_parameters, dense_values
from .settings import TargetSettings, _help


@dataclass
class GQASettings(TargetSettings):
    num_key_value_heads: int | None = _help(
        "key/value heads per edited layer; must divide the teacher's (default: the largest divisor of the teacher's "
        "count that is at most a third of it; SmolLM2-135M: 3 -> 1, Qwen3-8B: 8 -> 2)"
    )
    align: bool = _help(
        "init=teacher: align the heads of each group before averaging them (orthogonal maps of values, RoPE-preserving "
        "rotations of keys, absorbed into q_proj and o_proj); false: plain averaging",
        True,
    )


def default_kv_heads(teacher_kv_heads: int) -> int:
    """The largest divisor of the teacher's KV head count that is at most a third of it (at least 1)."""
    limit = max(1, teacher_kv_heads // 3)
    return max(k for k in range(1, limit + 1) if teacher_kv_heads % k == 0)


class GQATarget(Target):
    name = "gqa"
    settings = GQASettings
    attention = GQAAttention
    calibrated = True  # alignment reads each layer's keys and values on calibration text
    help = "GQA head reduction: the teacher's attention with its KV heads merged into fewer (a stock architecture)"
    exports: ClassVar[dict] = {"teacher": "GQA models: the teacher's own stock architecture with fewer KV heads (no remote code)"}

    def kv_heads(self, settings: GQASettings, spec: dict) -> int:
        return settings.num_key_value_heads or default_kv_heads(spec["num_kv_heads"])

    def check(self, settings: GQASettings, spec: dict, config) -> None:
        n, teacher = self.kv_heads(settings, spec), spec["num_kv_heads"]
        if not 1 <= n <= teacher or teacher % n:
            divisors = [k for k in range(1, teacher + 1) if teacher % k == 0]
            raise AttnEditError(f"num_key_value_heads={n}: must divide the teacher's {teacher} KV heads (one of {', '.join(map(str, divisors))})")

    def plan_layer(self, settings: GQASettings, layer: LayerPlan) -> dict:
        out = {"kind": "gqa", "num_kv_heads": self.kv_heads(settings, layer.spec)}
        if layer.window is not None:  # the teacher's own sliding window stays
            out["window"] = layer.window
        return out

    def cache_values(self, layer: dict, spec: dict, context: int) -> float:
        return dense_values(layer["num_kv_heads"], spec["head_dim"], layer.get("window"), layer.get("sink", 0), context)

    def cache_label(self, layer: dict) -> str:
        return "gqa" if layer.get("window") is None else "gqa-sliding"

    def parameters(self, layer: dict, spec: dict) -> int:
        return dense_parameters(spec, layer["num_kv_heads"])

    def init_from_teacher(self, attn: GQAAttention, teacher: nn.Module, layer: dict, spec: dict, inputs, settings: GQASettings) -> None:
        gqa_from_teacher(attn, teacher, spec, inputs, align=settings.align)

    def stock_format(self, model) -> str:
        return "teacher"  # written by attnedit/export/stock.py's export_teacher_format


def _cpu64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float64)


def pair_rotations(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per RoPE pair ``p`` (dims ``p`` and ``p + d/2``), the rotation of that plane taking ``a`` [n, d] closest to
    ``b`` [n, d] (least squares): its cos and sin, [d/2] each."""
    half = a.shape[1] // 2
    ax, ay, bx, by = a[:, :half], a[:, half:], b[:, :half], b[:, half:]
    angle = torch.atan2((ax * by - ay * bx).sum(0), (ax * bx + ay * by).sum(0))
    return angle.cos(), angle.sin()


def rotate_rows(w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the rows of one head's projection ``w`` [d, ...] pair by pair (rows ``p`` and ``p + d/2``)."""
    half = w.shape[0] // 2
    x, y = w[:half], w[half:]
    shape = (-1,) + (1,) * (w.dim() - 1)
    c, s = cos.view(shape), sin.view(shape)
    return torch.cat([c * x - s * y, s * x + c * y])


def procrustes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``Q`` [d, d] minimising ``||a Q - b||`` for ``a``, ``b`` [n, d]."""
    u, _, vt = torch.linalg.svd(a.T @ b)
    return u @ vt


@torch.no_grad()
def gqa_from_teacher(student: GQAAttention, teacher: nn.Module, spec: dict, x: torch.Tensor | None, align: bool = True) -> None:
    """Merge the teacher's KV heads into ``student.num_kv_heads`` (see the module doc); ``x`` [n, hidden]
    float64: the layer's inputs on calibration text (needed to align; None averages plainly)."""
    heads, kvh, d, new = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], student.num_kv_heads
    m, per_kv = kvh // new, heads // kvh  # teacher KV heads per merged head, query heads per teacher KV head
    wq = _cpu64(teacher.q_proj.weight).view(heads, d, -1).clone()
    bq = _cpu64(teacher.q_proj.bias)
    bq = bq.view(heads, d).clone() if bq is not None else None
    wk = _cpu64(teacher.k_proj.weight).view(kvh, d, -1).clone()
    bk = _cpu64(teacher.k_proj.bias)
    bk = bk.view(kvh, d).clone() if bk is not None else None
    wv = _cpu64(teacher.v_proj.weight).view(kvh, d, -1).clone()
    bv = _cpu64(teacher.v_proj.bias)
    bv = bv.view(kvh, d).clone() if bv is not None else None
    wo = _cpu64(teacher.o_proj.weight).view(-1, heads, d).clone()
    align = align and x is not None and m > 1
    rotate_keys = align and not spec["qk_norm"]

    def values(g):
        return x @ wv[g].T + (bv[g] if bv is not None else 0)

    def keys(g):
        return x @ wk[g].T + (bk[g] if bk is not None else 0)

    for j in range(new):
        group = list(range(j * m, (j + 1) * m))
        if not align:
            continue
        v_ref, k_ref = values(group[0]), keys(group[0])
        for _ in range(2):  # to the first head, then to the mean of the aligned heads
            v_new, k_new = [], []
            for g in group:
                q_map = procrustes(values(g), v_ref)
                wv[g] = q_map.T @ wv[g]
                if bv is not None:
                    bv[g] = q_map.T @ bv[g]
                for h in range(g * per_kv, (g + 1) * per_kv):
                    wo[:, h] = wo[:, h] @ q_map
                v_new.append(values(g))
                if rotate_keys:
                    cos, sin = pair_rotations(keys(g), k_ref)
                    wk[g] = rotate_rows(wk[g], cos, sin)
                    if bk is not None:
                        bk[g] = rotate_rows(bk[g], cos, sin)
                    for h in range(g * per_kv, (g + 1) * per_kv):
                        wq[h] = rotate_rows(wq[h], cos, sin)
                        if bq is not None:
                            bq[h] = rotate_rows(bq[h], cos, sin)
                    k_new.append(keys(g))
            v_ref = torch.stack(v_new).mean(0)
            k_ref = torch.stack(k_new).mean(0) if k_new else k_ref

    def merged(t: torch.Tensor) -> torch.Tensor:  # [kvh, d, ...] -> [new * d, ...], the mean of each group
        return t.view(new, m, *t.shape[1:]).mean(1).reshape(new * d, *t.shape[2:])

    def put(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src.reshape(dst.shape).to(dst))

    put(student.q_proj.weight, wq)
    put(student.k_proj.weight, merged(wk))
    put(student.v_proj.weight, merged(wv))
    put(student.o_proj.weight, wo)
    for lin, b in ((student.q_proj, bq), (student.k_proj, None if bk is None else merged(bk)), (student.v_proj, None if bv is None else merged(bv))):
        if lin.bias is not None:
            put(lin.bias, b if b is not None else torch.zeros(lin.bias.shape, dtype=torch.float64))
    if student.o_proj.bias is not None:
        put(student.o_proj.bias, _cpu64(teacher.o_proj.bias))
    if student.q_norm is not None:
        student.q_norm.weight.copy_(teacher.q_norm.weight)
        k_norm = _cpu64(teacher.k_norm.weight)
        if k_norm.numel() == kvh * d:  # a norm over the whole key projection: each merged head's mean gain
            k_norm = merged(k_norm.view(kvh, d))
        put(student.k_norm.weight, k_norm)
