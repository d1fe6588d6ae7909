"""Qwen2: biases on q/k/v (never on o); sliding layers, if any, are listed in ``layer_types``."""

from .base import Family

QWEN2 = Family(name="qwen2", model_types=("qwen2",), qkv_bias=True, o_bias=False)
