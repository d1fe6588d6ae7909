"""Qwen3-MoE: Qwen3's attention (QK-norm) over sparse-expert MLP blocks, which stay frozen and shared."""

from .base import Family, _window_everywhere

QWEN3_MOE = Family(name="qwen3_moe", model_types=("qwen3_moe",), qk_norm=True, teacher_window=_window_everywhere)
