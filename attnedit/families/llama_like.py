"""Families whose attention is Llama's, with their own names for biases, windows or layer norms; each runs the
teacher's own decoder layer (their MLPs and norms differ from Llama's, their attention does not).

* Ministral: Mistral with a per-layer ``layer_types`` list of sliding and full layers.
* Arcee: Llama's attention (its MLP has no gate).
* Seed-OSS: q/k/v biases (``attention_bias``) and an o_proj bias of its own (``attention_out_bias``).
* Apertus: per-head QK-norm; its layer norms are ``attention_layernorm`` / ``feedforward_layernorm``.
"""

from .base import Family

MINISTRAL = Family(name="ministral", model_types=("ministral",), qkv_bias=False, o_bias=False, layer="teacher")
ARCEE = Family(name="arcee", model_types=("arcee",), layer="teacher")
SEED_OSS = Family(name="seed_oss", model_types=("seed_oss",), o_bias="attention_out_bias", layer="teacher")
APERTUS = Family(name="apertus", model_types=("apertus",), qk_norm=True, layer="teacher")
