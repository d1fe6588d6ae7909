"""Qwen3: per-head RMSNorm on queries and keys (QK-norm) before RoPE."""

from .base import Family

QWEN3 = Family(name="qwen3", model_types=("qwen3",), qk_norm=True)
