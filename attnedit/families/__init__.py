"""Model families attnedit can edit. One file per family; register it in ``FAMILIES``."""

from __future__ import annotations

from ..errors import AttnEditError
from .base import Family
from .gemma import GEMMA2, GEMMA3
from .granite import GRANITE
from .llama import LLAMA
from .llama_like import APERTUS, ARCEE, MINISTRAL, SEED_OSS
from .mistral import MISTRAL
from .olmo import OLMO2, OLMO3
from .phi3 import PHI3
from .qwen2 import QWEN2
from .qwen3 import QWEN3
from .qwen3_moe import QWEN3_MOE

FAMILIES: dict[str, Family] = {
    f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, QWEN3_MOE, GEMMA2, GEMMA3, PHI3, OLMO2, OLMO3, GRANITE, MINISTRAL, ARCEE, SEED_OSS, APERTUS)
}

# model types transformers knows whose attention attnedit cannot convert yet, and the part that is missing
UNSUPPORTED: dict[str, str] = {
    "gemma3": "the multimodal Gemma 3 has a vision tower; convert its text model (Gemma3ForCausalLM, model type gemma3_text)",
    "cohere": "Cohere's attention rotates interleaved RoPE pairs; attnedit's RoPE is half-split (Llama's)",
    "cohere2": "Cohere's attention rotates interleaved RoPE pairs; attnedit's RoPE is half-split (Llama's)",
    "helium": "Helium rotates interleaved RoPE pairs; attnedit's RoPE is half-split (Llama's)",
    "gpt_oss": "gpt-oss attention has learned per-head sink logits, which attnedit's attentions have no place for",
    "smollm3": "SmolLM3 skips RoPE in some layers (no_rope_layers); attnedit's attentions always apply RoPE",
    "exaone4": "EXAONE 4 skips RoPE in its full-attention layers; attnedit's attentions always apply RoPE",
    "glm4": "GLM-4 rotates only part of each head (partial RoPE), in interleaved pairs",
    "stablelm": "StableLM rotates only part of each head (partial_rotary_factor < 1)",
    "phi": "Phi-1/2 rotate only part of each head (partial_rotary_factor < 1) and use a parallel attention/MLP block",
    "gpt2": "GPT-2 has learned absolute positions and a fused c_attn projection, no RoPE",
}


def family_for(config) -> Family:
    """The family adapter for a transformers config, or a one-line error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    if model_type in UNSUPPORTED:
        raise AttnEditError(f"model type {model_type!r} is not supported: {UNSUPPORTED[model_type]}; supported families: {supported}")
    raise AttnEditError(
        f"model type {model_type!r} is not supported: attnedit has no family adapter describing its attention "
        f"(attnedit/families/); supported families: {supported}"
    )


__all__ = ["FAMILIES", "UNSUPPORTED", "Family", "family_for"]
