"""What attnedit needs to know about a model family: where attention lives and what it computes.

Adding a family is one small file that builds a :class:`Family` and one line in ``__init__.py``.
The supported families share the pre-norm decoder layout (``model.layers[i]`` with
``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``), which the edited model
runs itself; a family that differs needs its own layer loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AttnEditError


def _window_from_layer_types(config, layer_idx: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer_idx] == "sliding_attention":
        return getattr(config, "sliding_window", None)
    return None


def _window_everywhere(config, layer_idx: int) -> int | None:
    return getattr(config, "sliding_window", None)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    qk_norm: bool = False
    qkv_bias: str | bool = "attention_bias"  # a config attribute name, or a fixed answer
    o_bias: str | bool = "attention_bias"
    teacher_window: object = _window_from_layer_types  # (config, layer_idx) -> window or None

    def _flag(self, config, rule) -> bool:
        return bool(getattr(config, rule, False)) if isinstance(rule, str) else rule

    def attention_spec(self, config) -> dict:
        """The teacher attention's shapes, stored in every edited config (remote code needs no adapter)."""
        if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
            raise AttnEditError(f"{self.name}: partial rotary embeddings are not supported yet")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return {
            "hidden_size": config.hidden_size,
            "num_heads": config.num_attention_heads,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "head_dim": head_dim,
            "qkv_bias": self._flag(config, self.qkv_bias),
            "o_bias": self._flag(config, self.o_bias),
            "qk_norm": self.qk_norm,
            "rms_norm_eps": float(config.rms_norm_eps),
        }

    def window(self, config, layer_idx: int) -> int | None:
        """The teacher's own sliding window for this layer (None = full attention)."""
        return self.teacher_window(config, layer_idx)

    def layers(self, model):
        return model.model.layers

    def attention(self, model, layer_idx: int):
        return self.layers(model)[layer_idx].self_attn
