"""Tiny random teachers of every supported family, for fast CPU tests.

``FAMILY_BUILDERS``: the pre-norm families every target test runs on; ``MORE_FAMILIES``: the families whose own
decoder layer runs around the new attention (``tests/test_families.py`` holds their contract), each with the
features that make it differ (sliding layers, soft-capping, score scales, per-layer RoPE, multipliers)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILY_BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16)),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
}
FAMILY_NAMES = list(FAMILY_BUILDERS)

_ALTERNATE = ["sliding_attention", "full_attention"] * 2  # 4 layers: two slide over 6 tokens


def _build(config_cls: str, model_cls: str, **kwargs):
    import transformers

    args = {**COMMON, **kwargs}
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**args))


MORE_FAMILIES = {
    "gemma2": lambda: _build(
        "Gemma2Config", "Gemma2ForCausalLM", head_dim=16, query_pre_attn_scalar=24, sliding_window=6, layer_types=_ALTERNATE,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
    ),
    "gemma3": lambda: _build(
        "Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, query_pre_attn_scalar=24, sliding_window=6, layer_types=_ALTERNATE,
        final_logit_softcapping=3.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
    ),
    "phi3": lambda: _build("Phi3Config", "Phi3ForCausalLM", sliding_window=None),
    "olmo2": lambda: _build("Olmo2Config", "Olmo2ForCausalLM"),
    "olmo3": lambda: _build("Olmo3Config", "Olmo3ForCausalLM", sliding_window=6, layer_types=_ALTERNATE),
    "granite": lambda: _build(
        "GraniteConfig", "GraniteForCausalLM", embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=1.7
    ),
    "ministral": lambda: _build("MinistralConfig", "MinistralForCausalLM", head_dim=16, sliding_window=6, layer_types=_ALTERNATE),
    "arcee": lambda: _build("ArceeConfig", "ArceeForCausalLM"),
    "seed_oss": lambda: _build("SeedOssConfig", "SeedOssForCausalLM", head_dim=16, attention_bias=True, attention_out_bias=True),
    "apertus": lambda: _build("ApertusConfig", "ApertusForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}  # fmt: skip
MORE_FAMILY_NAMES = list(MORE_FAMILIES)


def tiny_teacher(family: str = "llama", seed: int = 0):
    """A randomly initialised teacher; biases (qwen2) and norms get non-trivial values."""
    torch.manual_seed(seed)
    model = {**FAMILY_BUILDERS, **MORE_FAMILIES}[family]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_ids(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def perturbed(model, scale: float = 0.05):
    """``model`` with every weight moved by ``scale`` times a fixed normal draw: random teachers give near-uniform
    logits, and a comparison of logits (an export's, a wrong key set's) means something only away from them."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return model
