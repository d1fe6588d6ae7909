"""Llama (and SmolLM2, which is Llama): GQA, optional biases on all four projections."""

from .base import Family

LLAMA = Family(name="llama", model_types=("llama",))
