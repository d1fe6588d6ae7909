"""Mistral: Llama's attention without biases; ``sliding_window``, when set, applies to every layer."""

from .base import Family, _window_everywhere

MISTRAL = Family(name="mistral", model_types=("mistral",), qkv_bias=False, o_bias=False, teacher_window=_window_everywhere)
