"""Granite (and Granite-MoE): Llama's attention with the softmax scale ``attention_multiplier``; the teacher's own
layer scales each residual branch by ``residual_multiplier``; the embeddings are multiplied by
``embedding_multiplier`` and the logits divided by ``logits_scaling``."""

from .base import Family

GRANITE = Family(
    name="granite",
    model_types=("granite", "granitemoe"),
    scaling="attention_multiplier",
    layer="teacher",
    backbone_fields=("embedding_multiplier", "logits_scaling"),
)
