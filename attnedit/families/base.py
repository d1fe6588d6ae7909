"""What attnedit needs to know about a model family: where attention lives and what it computes.

Adding a family is one small file that builds a :class:`Family` and one line in ``__init__.py``. The
family's attention must go through transformers' attention interface as the Llama one does: q/k/v/o
projections (or one fused qkv, as Phi-3's), RoPE on queries and keys, optional QK-norm, and a softmax
whose scale, soft-capping and sliding window the teacher's config gives. Everything around the attention
stays the teacher's own code: for the Llama/Qwen pre-norm layout (``input_layernorm``, ``self_attn``,
``post_attention_layernorm``, ``mlp``) the edited model runs its fast loop (``layer="prenorm"``); any other
layout (``layer="teacher"``) runs the teacher's own decoder layer around the new attention, so sandwich
norms (Gemma), post-norm (OLMo 2) and residual multipliers (Granite) come as the teacher computes them.
What the family describes is written into every edited config (``teacher_attention``, ``backbone``), so
the checkpoint's remote code needs no adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import AttnEditError


def _window_from_layer_types(config, layer_idx: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer_idx] == "sliding_attention":
        return getattr(config, "sliding_window", None)
    return None


def _window_everywhere(config, layer_idx: int) -> int | None:
    return getattr(config, "sliding_window", None)


# RoPE types whose frequencies depend on the sequence length at run time; attnedit's RoPE tables are static
_DYNAMIC_ROPE = ("dynamic", "longrope")


def rope_parameters(config, layer_idx: int) -> dict:
    """The RoPE parameters of one layer: the config's ``rope_parameters``, or, where they are given per layer
    type (Gemma 3, OLMo 3: ``{"sliding_attention": {...}, "full_attention": {...}}``), this layer's."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    layer_types = getattr(config, "layer_types", None) or []
    if layer_types and layer_types[layer_idx] in params and isinstance(params[layer_types[layer_idx]], dict):
        return dict(params[layer_types[layer_idx]])
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def per_layer_rope(config) -> bool:
    params = getattr(config, "rope_parameters", None) or {}
    return any(isinstance(v, dict) for v in params.values())


@dataclass(frozen=True)
class Family:
    """One model family. The defaults are Llama's; each field says what differs.

    ``qk_norm``: False, True (per head, Qwen3) or ``"projection"`` (over the whole q / k projection, OLMo 2).
    ``norm_offset``: 1.0 when RMSNorm gains are ``1 + weight`` (Gemma). ``scaling``: the config attribute whose
    value sets the softmax scale (``query_pre_attn_scalar`` means ``value ** -0.5``; any other is the scale
    itself, as Granite's ``attention_multiplier``). ``softcap``: the config attribute of the attention's score
    soft-capping (Gemma 2). ``fused_qkv``: the name of a fused q/k/v projection (Phi-3's ``qkv_proj``), split
    when editing. ``layer``: ``"prenorm"`` or ``"teacher"`` (see the module doc). ``backbone``: config
    attributes of the model-level multipliers the edited model applies (``embedding_multiplier``,
    ``logits_scaling``, ``final_logit_softcapping``).
    """

    name: str
    model_types: tuple[str, ...]
    qk_norm: bool | str = False
    qkv_bias: str | bool = "attention_bias"  # a config attribute name, or a fixed answer
    o_bias: str | bool = "attention_bias"
    teacher_window: object = _window_from_layer_types  # (config, layer_idx) -> window or None
    layer: str = "prenorm"
    norm_offset: float = 0.0
    scaling: str | None = None
    softcap: str | None = None
    fused_qkv: str | None = None
    backbone_fields: tuple[str, ...] = ()

    def _flag(self, config, rule) -> bool:
        return bool(getattr(config, rule, False)) if isinstance(rule, str) else rule

    def check(self, config) -> None:
        """A one-line refusal for what attnedit cannot convert in this config."""
        params = getattr(config, "rope_parameters", None) or {}
        partial = [params.get("partial_rotary_factor"), getattr(config, "partial_rotary_factor", None)]
        if any(p not in (None, 1.0) for p in partial):
            raise AttnEditError(f"{self.name}: partial rotary embeddings (partial_rotary_factor < 1) are not supported yet")
        for i in range(config.num_hidden_layers):
            rope_type = rope_parameters(config, i).get("rope_type", "default")
            if rope_type in _DYNAMIC_ROPE:
                raise AttnEditError(
                    f"{self.name}: RoPE type {rope_type!r} changes its frequencies with the sequence length, which attnedit's "
                    "RoPE tables do not follow yet; supported: default, linear, llama3, yarn"
                )
        if getattr(config, "use_bidirectional_attention", False):
            raise AttnEditError(f"{self.name}: bidirectional attention (use_bidirectional_attention) is not supported; causal only")

    def scale(self, config) -> float | None:
        if self.scaling is None:
            return None
        value = float(getattr(config, self.scaling))
        return value**-0.5 if self.scaling == "query_pre_attn_scalar" else value

    def attention_spec(self, config) -> dict:
        """The teacher attention's shapes, stored in every edited config (remote code needs no adapter)."""
        self.check(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        spec = {
            "hidden_size": config.hidden_size,
            "num_heads": config.num_attention_heads,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "head_dim": head_dim,
            "qkv_bias": self._flag(config, self.qkv_bias),
            "o_bias": self._flag(config, self.o_bias),
            "qk_norm": self.qk_norm,
            "rms_norm_eps": float(getattr(config, "rms_norm_eps", None) or 1e-6),
        }
        # what only some families have: absent keys mean Llama's behaviour (older checkpoints have none of them)
        extra = {
            "scaling": self.scale(config),
            "softcap": getattr(config, self.softcap, None) if self.softcap else None,
            "norm_offset": self.norm_offset or None,
            "layer_rope": [rope_parameters(config, i) for i in range(config.num_hidden_layers)] if per_layer_rope(config) else None,
        }
        spec.update({k: v for k, v in extra.items() if v is not None})
        return spec

    def backbone(self, config) -> dict:
        """How the edited model runs the teacher's backbone (``AttnEditConfig.backbone``); empty for Llama's."""
        out = {"layer": self.layer} if self.layer != "prenorm" else {}
        for name in self.backbone_fields:
            value = getattr(config, name, None)
            if value is not None:
                out[name] = value
        return out

    def window(self, config, layer_idx: int) -> int | None:
        """The teacher's own sliding window for this layer (None = full attention)."""
        return self.teacher_window(config, layer_idx)

    def rope(self, config, layer_idx: int) -> dict:
        """This layer's RoPE parameters (``rope_theta``, ``rope_type`` and its scaling)."""
        return rope_parameters(config, layer_idx)

    def layers(self, model):
        return model.model.layers

    def attention(self, model, layer_idx: int):
        return self.layers(model)[layer_idx].self_attn

    def projections(self, model, layer_idx: int) -> nn.Module:
        """The teacher attention of layer ``layer_idx`` with separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``
        (and ``q_norm``/``k_norm`` where it has them): the attention itself, or, for a fused q/k/v, a module
        whose q/k/v are views of the fused weight (no copy)."""
        attn = self.attention(model, layer_idx)
        if self.fused_qkv is None:
            return attn
        fused = getattr(attn, self.fused_qkv)
        spec = self.attention_spec(model.config)
        d = spec["head_dim"]
        sizes = [spec["num_heads"] * d, spec["num_kv_heads"] * d, spec["num_kv_heads"] * d]
        split = nn.Module()
        start = 0
        for name, size in zip(("q_proj", "k_proj", "v_proj"), sizes):
            lin = nn.Linear(fused.in_features, size, bias=fused.bias is not None, device="meta")
            lin.weight = nn.Parameter(fused.weight[start : start + size], requires_grad=fused.weight.requires_grad)
            if fused.bias is not None:
                lin.bias = nn.Parameter(fused.bias[start : start + size], requires_grad=fused.bias.requires_grad)
            setattr(split, name, lin)
            start += size
        split.o_proj = attn.o_proj
        return split
