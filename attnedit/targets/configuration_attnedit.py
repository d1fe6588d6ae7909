"""Configuration of an edited model: the teacher's config plus one attention description per layer.

``layer_attention[i]`` is a dict with ``kind`` in ``dense`` (the teacher's attention, unedited),
``mla``, ``gateswa``, ``gqa`` (or a kind an outside target adds, whose class ``attention_code`` names as
``"file.Class"`` in the checkpoint's folder) and that kind's settings; ``teacher_attention`` describes the
teacher's attention (heads, head_dim, biases, QK-norm, score scale and soft-capping, per-layer RoPE). The
backbone (embeddings, MLP or MoE blocks, norms) is rebuilt from ``base_config`` by transformers itself;
``backbone`` says how to run it: ``layer`` ``"prenorm"`` (attnedit's own loop over the Llama/Qwen layout,
the default) or ``"teacher"`` (each of the teacher's decoder layers runs its own forward around the new
attention: sandwich and post-norm layouts, residual multipliers), and the model-level multipliers
``embedding_multiplier``, ``logits_scaling`` and ``final_logit_softcapping`` where the teacher has them.
"""

from __future__ import annotations

from transformers import PretrainedConfig

_COPIED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "rms_norm_eps",
)


class AttnEditConfig(PretrainedConfig):
    model_type = "attnedit"

    def __init__(
        self,
        base_config: dict | None = None,
        teacher_attention: dict | None = None,
        layer_attention: list | None = None,
        family: str | None = None,
        edit: dict | None = None,
        backbone: dict | None = None,
        attention_code: dict | None = None,
        **kwargs,
    ):
        self.base_config = dict(base_config or {})
        if teacher_attention is None:  # checkpoints written before the rename call it ``attention``
            teacher_attention = kwargs.pop("attention", None)
        kwargs.pop("attention", None)
        self.teacher_attention = dict(teacher_attention or {})
        self.layer_attention = [dict(x) for x in (layer_attention or [])]
        self.family = family
        self.edit = dict(edit or {})
        self.backbone = dict(backbone or {})
        self.attention_code = dict(attention_code or {})
        for key in _COPIED:
            if key in self.base_config and key not in kwargs:
                kwargs[key] = self.base_config[key]
        tie = kwargs.pop("tie_word_embeddings", False)
        for key in _COPIED:
            if key in kwargs and key not in ("bos_token_id", "eos_token_id", "pad_token_id"):
                setattr(self, key, kwargs.pop(key))
        self.tie_word_embeddings = tie
        super().__init__(**kwargs)
        self.tie_word_embeddings = tie
