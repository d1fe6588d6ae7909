"""``attnedit inspect``: per-layer attention kind, parameters and KV bytes of a teacher or edited model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..schema import require, setting
from ..tables import human_bytes, text_table
from .kv import kv_summary, max_context, usable_context


@dataclass
class InspectSettings:
    """Where the KV figures are taken (``attnedit inspect``'s flags; ``edit`` prints them at ``context`` too)."""

    context: int = setting(8192, "sequence length in tokens for the KV figures")
    dtype: str | None = setting(None, "cache dtype (default: the model's, else bfloat16)")

    def __post_init__(self):
        require(self, [(self.context >= 1, "context", "must be at least 1 token")])


def count_parameters(config) -> int:
    """Total parameters, counted on the meta device (no weights are read or allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        if getattr(config, "model_type", None) == "attnedit":
            from ..targets import AttnEditForCausalLM

            model = AttnEditForCausalLM(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def inspect_config(config, context: int, dtype: str | None = None) -> dict:
    """Everything ``attnedit inspect`` shows, as a dict (the ``--json`` output). A ``context`` longer than
    the model's longest is taken at the model's longest (``context_asked`` says what was asked)."""
    asked, context = context, usable_context(config, context)
    summary = kv_summary(config, context, dtype)
    if asked != context:
        summary["context_asked"] = asked
    summary["params"] = count_parameters(config)
    summary["model_type"] = config.model_type
    if config.model_type == "attnedit":
        from ..targets.modeling_attnedit import base_config_object

        teacher = kv_summary(base_config_object(config.base_config), context, dtype or summary["dtype"])
        summary["teacher_kv_bytes_per_token"] = teacher["kv_bytes_per_token"]
        summary["kv_ratio_vs_teacher"] = summary["kv_bytes_per_token"] / teacher["kv_bytes_per_token"]
        summary["edit"] = config.edit
        summary["notes"] = layout_notes(config) + rope_notes(config, context)
    return summary


def rope_wavelength(layer: dict) -> float | None:
    """Tokens per turn of the slowest rotary pair an MLA layer's RoPE key keeps (``rope_theta ^ ((rope - 2) / rope)``
    times 2 pi); None for other layers. The teacher's slower pairs are in the latent without position."""
    if layer.get("kind") != "mla" or not layer.get("rope_theta") or not layer.get("qk_rope_head_dim"):
        return None
    rope = layer["qk_rope_head_dim"]
    return 2 * math.pi * float(layer["rope_theta"]) ** ((rope - 2) / rope)


def layout_notes(config) -> list[str]:
    """What an edited config does that its settings may not make plain: a GateSWA ``full_layers=every:K``
    that keeps no full layer (the model has fewer than K layers)."""
    edit = getattr(config, "edit", None) or {}
    full_layers = str((edit.get("settings") or {}).get("full_layers", ""))
    layers = config.layer_attention
    if edit.get("target") == "gateswa" and full_layers.startswith("every:") and not any(x.get("layer_type") == "full" for x in layers):
        return [
            f"full_layers={full_layers} keeps no full layer on this {len(layers)}-layer model (every:K makes layers K-1, "
            f"2K-1, ... full): every edited layer slides; set full_layers (e.g. every:{max(1, len(layers) // 2)} or 1,3) to keep some"
        ]
    return []


def rope_notes(config, context: int | None = None) -> list[str]:
    """An MLA RoPE key whose slowest pair turns in fewer tokens than ``context`` (default: the model's longest):
    the teacher's slower pairs are in the latent without position (``docs/results.md`` measures what that costs)."""
    context = context or max_context(config)
    waves = [(w, x["qk_rope_head_dim"]) for x in config.layer_attention if (w := rope_wavelength(x)) is not None]
    if not waves or not context or min(waves)[0] >= context:
        return []
    wave, rope = min(waves)
    return [
        f"MLA's RoPE key (qk_rope_head_dim={rope}) keeps the teacher's rotary pairs down to a wavelength of "
        f"{wave:,.0f} tokens, under the context of {context:,}: the slower pairs are in the latent without "
        "position (measured on SmolLM2 and Qwen2.5: the start errs more the further back a key lies); a larger "
        "qk_rope_head_dim with a smaller kv_lora_rank keeps the cache bytes and more of them, and on both teachers "
        "started closer at 8k (docs/results.md)"
    ]


def format_inspection(info: dict) -> str:
    rows = [[x["layer"], x["kind"], x["params"], round(x["values_per_token"], 2), human_bytes(x["bytes_per_token"])] for x in info["layers"]]
    table = text_table(["layer", "attention", "attn params", "KV values/token", "KV bytes/token"], rows, right={0, 2, 3, 4})
    lines = [
        table,
        "",
        f"model type            {info['model_type']}",
        f"parameters            {info['params']:,} (attention {info['attention_params']:,})",
        f"context               {info['context']:,} tokens, cache dtype {info['dtype']}"
        + (f" (the model's longest; {info['context_asked']:,} asked)" if "context_asked" in info else ""),
        f"KV bytes per token    {human_bytes(info['kv_bytes_per_token'])} (all layers)",
        f"KV bytes at context   {human_bytes(info['kv_bytes_total'])} per sequence",
    ]
    if "kv_ratio_vs_teacher" in info:
        lines.append(
            f"vs teacher            {info['kv_ratio_vs_teacher']:.1%} of the teacher's "
            f"{human_bytes(info['teacher_kv_bytes_per_token'])}/token ({1 - info['kv_ratio_vs_teacher']:.1%} smaller)"
        )
    lines += [f"note                  {n}" for n in info.get("notes", [])]
    return "\n".join(lines)
