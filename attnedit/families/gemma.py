"""Gemma 2 and Gemma 3 (text): sandwich norms (``post_attention_layernorm`` on the attention's output,
``pre_``/``post_feedforward_layernorm`` around the MLP) run by the teacher's own layer; RMSNorm gains are
``1 + weight``; the softmax scale is ``query_pre_attn_scalar ** -0.5``; every other layer (Gemma 2) or five in
six (Gemma 3) slide over ``sliding_window`` tokens; Gemma 2 soft-caps attention scores
(``attn_logit_softcapping``) and both soft-cap the final logits (``final_logit_softcapping``); Gemma 3 has
per-head QK-norm and a RoPE base per layer type (local for sliding layers, global for full ones)."""

from .base import Family

_GEMMA = {
    "layer": "teacher",
    "norm_offset": 1.0,
    "scaling": "query_pre_attn_scalar",
    "softcap": "attn_logit_softcapping",
    "backbone_fields": ("final_logit_softcapping",),
}

GEMMA2 = Family(name="gemma2", model_types=("gemma2",), **_GEMMA)
GEMMA3 = Family(name="gemma3", model_types=("gemma3_text",), qk_norm=True, **_GEMMA)
