"""The toy target's :class:`~attnedit.surgery.api.Target`: what attnedit needs to convert a model to
``toy_attention.TiedKVAttention`` (settings, per-layer plan, analytic cache size, initialisation from the
teacher). ``docs/targets.md`` walks through this file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from toy_attention import TiedKVAttention

from attnedit.errors import AttnEditError
from attnedit.surgery import LayerPlan, Target, TargetSettings


@dataclass
class TiedKVSettings(TargetSettings):
    kv_heads: int | None = field(default=None, metadata={"help": "key/value heads (default: the teacher's)"})


class TiedKVTarget(Target):
    name = "tiedkv"
    settings = TiedKVSettings
    attention = TiedKVAttention
    code = (Path(__file__).with_name("toy_attention.py"),)  # copied into every checkpoint
    help = "tied keys and values: each KV head caches its rotated key, which is also its value"

    def check(self, settings: TiedKVSettings, spec: dict, config) -> None:
        if settings.kv_heads is not None and spec["num_heads"] % settings.kv_heads:
            raise AttnEditError(f"kv_heads={settings.kv_heads}: must divide the {spec['num_heads']} query heads")

    def plan_layer(self, settings: TiedKVSettings, layer: LayerPlan) -> dict:
        if layer.window is not None:
            raise AttnEditError(f"tiedkv has no sliding window; layer {layer.index} of this teacher slides")
        return {"kind": "tiedkv", "kv_heads": settings.kv_heads or layer.spec["num_kv_heads"]}

    def cache_values(self, layer: dict, spec: dict, context: int) -> float:
        return float(layer["kv_heads"] * spec["head_dim"])

    @torch.no_grad()
    def init_from_teacher(self, attn, teacher, layer: dict, spec: dict, inputs, settings) -> None:
        if attn.kv_heads != spec["num_kv_heads"]:
            raise AttnEditError("tiedkv starts from the teacher only with the teacher's KV head count")
        for name in ("q_proj", "k_proj", "o_proj"):
            getattr(attn, name).load_state_dict(getattr(teacher, name).state_dict())
