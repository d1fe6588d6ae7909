"""Model families attnedit can edit. One file per family; register it in ``FAMILIES``."""

from __future__ import annotations

from ..errors import AttnEditError
from .base import Family
from .llama import LLAMA
from .mistral import MISTRAL
from .qwen2 import QWEN2
from .qwen3 import QWEN3
from .qwen3_moe import QWEN3_MOE

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, QWEN3_MOE)}


def family_for(config) -> Family:
    """The family adapter for a transformers config, or a one-line error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    raise AttnEditError(f"model type {model_type!r} is not supported; supported families: {supported}")


__all__ = ["FAMILIES", "Family", "family_for"]
