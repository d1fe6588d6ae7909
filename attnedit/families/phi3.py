"""Phi-3: one fused ``qkv_proj`` (split into q/k/v when editing: views of the teacher's weight, no copy) and a
fused ``gate_up_proj`` MLP, both left to the teacher's own layer; no biases; ``sliding_window``, when set,
applies to every layer."""

from .base import Family, _window_everywhere

PHI3 = Family(name="phi3", model_types=("phi3",), qkv_bias=False, o_bias=False, fused_qkv="qkv_proj", layer="teacher",
              teacher_window=_window_everywhere)  # fmt: skip
