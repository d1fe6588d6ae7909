"""Initialising new attention weights: random (the paper's choice) or from the teacher's weights.

Teacher initialisation is approximate by nature and only a starting point for the distillation:

* GateSWA copies q/k/v/o (and QK-norm); the gate starts at ``gate_init`` everywhere and ``o_proj`` is
  divided by it, so the layer starts as the teacher's attention restricted to its window. With
  ``gate=none`` there is no gate and the copy is exact.
* MLA: see :mod:`attnedit.surgery.mla_init` (calibrated on the teacher's activations).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..targets import GateSWAAttention, RMSNorm


@torch.no_grad()
def random_init(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.constant_(m.weight, 1.0 - m.offset)  # a unit gain (Gemma's norms store gain - 1)
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
