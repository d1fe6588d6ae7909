"""The built-in targets as :class:`~attnedit.surgery.api.Target` s: MLA and GateSWA (their settings, plans and
initialisations live in ``settings.py`` and ``init.py``), and GQA head reduction (``gqa.py``, a target written
in one module through the API). Their stock formats are named here and written by ``attnedit/export``."""

from __future__ import annotations

from typing import ClassVar

from ..families import family_for
from ..targets import GateSWAAttention, MLAAttention
from ..targets.split_heads import cached_values
from .api import LayerPlan, Target, dense_parameters, dense_values
from .gqa import GQATarget
from .init import gateswa_from_teacher, random_init, set_gate
from .mla_init import collect_stats, plan_mla_init, write_mla
from .selection import gateswa_layout, parse_choice, resolve_auto
from .settings import (
    GateSWASettings,
    MLASettings,
    parse_layer_list,
    parse_settings,
    plan_gateswa,
    plan_mla,
)


class MLATarget(Target):
    name = "mla"
    settings = MLASettings
    attention = MLAAttention
    calibrated = True  # the teacher's activations shape the factorisation (mla_init.py)
    help = "multi-head latent attention (DeepSeek-V2/V3): caches one low-rank latent and a shared RoPE key per token"
    exports: ClassVar[dict] = {"deepseek_v3": "all-MLA models: stock DeepSeek-V3 (transformers without remote code, vLLM, SGLang)"}

    def plan_layer(self, settings: MLASettings, layer: LayerPlan) -> dict:
        out = plan_mla(settings, layer.spec, layer.config, layer.rope)
        if layer.window is not None:  # the teacher's sliding layer stays windowed: a ring of latents
            out.update(window=layer.window, sink=0)
        return out

    def cache_values(self, layer: dict, spec: dict, context: int) -> float:
        values = layer["kv_lora_rank"] + layer["qk_rope_head_dim"]
        window = layer.get("window")
        return float(values) if window is None else values * min(window + layer.get("sink", 0), context) / context

    def cache_label(self, layer: dict) -> str:
        return "mla" if layer.get("window") is None else "mla-sliding"

    def parameters(self, layer: dict, spec: dict) -> int:
        h, heads = spec["hidden_size"], spec["num_heads"]
        qk = layer["qk_nope_head_dim"] + layer["qk_rope_head_dim"]
        r, rope, v = layer["kv_lora_rank"], layer["qk_rope_head_dim"], layer["v_head_dim"]
        q = h * heads * qk if layer.get("q_lora_rank") is None else layer["q_lora_rank"] * (h + 1 + heads * qk)
        return q + h * (r + rope) + r + r * heads * (layer["qk_nope_head_dim"] + v) + heads * v * h

    def calibrate(self, teacher, layers: list[int], ids, config, settings) -> dict:
        """Second moments of each layer's inputs, the factorisation they give, and (``rank_allocation: auto``) each
        layer's share of the total latent width, written into ``config.layer_attention``."""
        stats = collect_stats(teacher, layers, ids, weighting=settings.init_weighting)
        factors, ranks = plan_mla_init(teacher, stats, config.layer_attention, settings.rank_allocation, ids)
        for i, r in ranks.items():
            config.layer_attention[i]["kv_lora_rank"] = r
        return {i: (factors[i], stats[i]) for i in layers}

    def init_from_teacher(self, attn, teacher, layer: dict, spec: dict, inputs, settings) -> None:
        factors, stats = inputs
        write_mla(attn, teacher, factors, stats, spec)  # folds a teacher's own softmax scale into the query

    def stock_format(self, model) -> str:
        return "deepseek_v3"


# the stock sliding-window format a gate-less GateSWA model of each family is written in by default
DEFAULT_SWA_FORMAT = {
    "llama": "ministral",
    "mistral": "ministral",
    "ministral": "ministral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "olmo3": "olmo3",
}


class GateSWATarget(Target):
    name = "gateswa"
    settings = GateSWASettings
    attention = GateSWAAttention
    help = "gated hybrid sliding-window attention: most layers keep a window of recent tokens, a few layers (or KV heads) stay full"
    exports: ClassVar[dict] = {
        "ministral": "GateSWA with gate=none, sink=0, Llama/Mistral/Ministral teachers: stock Ministral with layer_types",
        "qwen2": "GateSWA with gate=none, sink=0, Qwen2 (or Llama/Mistral, zero q/k/v biases): stock Qwen2 with layer_types",
        "qwen3": "GateSWA with gate=none, sink=0, Qwen3 teachers: stock Qwen3 with layer_types (transformers only)",
        "qwen3_moe": "GateSWA with gate=none, sink=0, full_layers=none, Qwen3-MoE teachers: stock Qwen3-MoE",
        "gemma2": "GateSWA with gate=none, sink=0, one window, Gemma 2 teachers: stock Gemma 2 with layer_types",
        "gemma3_text": "GateSWA with gate=none, sink=0, one window, Gemma 3 teachers: stock Gemma 3 (text) with layer_types",
        "olmo3": "GateSWA with gate=none, sink=0, one window, OLMo 3 teachers: stock OLMo 3 with layer_types",
    }

    def plan_layer(self, settings: GateSWASettings, layer: LayerPlan) -> dict:
        # the full layers and KV heads (selection.py: an unmeasured auto choice spread evenly, under its KV budget)
        edited = parse_layer_list(settings.layers, layer.n_layers, "layers")
        full, heads = gateswa_layout(settings, layer.config, family_for(layer.config), edited)
        return plan_gateswa(settings, layer.spec, layer.config, layer.index, full, heads, teacher_window=layer.window)

    def cache_values(self, layer: dict, spec: dict, context: int) -> float:
        window = layer["window"] if layer["layer_type"] == "sliding" else None
        if window is not None and layer.get("full_kv_heads"):  # some KV heads full: 2 d (f + (n - f) min(window + sink, L) / L)
            full = len(layer["full_kv_heads"])
            return cached_values(spec["num_kv_heads"], spec["head_dim"], window, layer.get("sink", 0), context, full)
        return dense_values(spec["num_kv_heads"], spec["head_dim"], window, layer.get("sink", 0), context)

    def cache_label(self, layer: dict) -> str:
        return "gateswa-heads" if layer["layer_type"] == "sliding" and layer.get("full_kv_heads") else f"gateswa-{layer['layer_type']}"

    def choose(self, teacher, target_args: dict, blocks, measured: dict | None = None, long_range=None) -> tuple[dict, dict | None]:
        """An ``auto`` choice of full layers or KV heads, measured on ``auto_seq_len``-token blocks (selection.py)."""
        seq_len = parse_settings(self.name, target_args).auto_seq_len
        calibration = None if blocks is None else lambda: blocks(seq_len)
        return resolve_auto(teacher, target_args, calibration, measured, long_range)

    def unmeasured(self, settings: GateSWASettings) -> str | None:
        for key in ("full_layers", "full_heads"):
            if parse_choice(getattr(settings, key), key) is not None:
                return (
                    f"{key}={getattr(settings, key)} is measured on training data: run attnedit convert with it (it "
                    "measures on the recipe's data and records the choice in full_layers.json), or give explicit ones"
                )
        return None

    def parameters(self, layer: dict, spec: dict) -> int:
        n = dense_parameters(spec)
        if layer.get("gate") != "none":
            width = spec["num_heads"] * spec["head_dim"] if layer["gate"] == "elementwise" else spec["num_heads"]
            n += spec["hidden_size"] * width + width
        return n

    def init_random(self, attn, layer: dict, std: float) -> None:
        random_init(attn, std)
        set_gate(attn, layer["gate_bias"])

    def init_from_teacher(self, attn, teacher, layer: dict, spec: dict, inputs, settings) -> None:
        gateswa_from_teacher(attn, teacher, layer["gate_bias"])

    def stock_format(self, model) -> str | None:
        return DEFAULT_SWA_FORMAT.get(model.config.family)


BUILTIN = (MLATarget(), GateSWATarget(), GQATarget())  # added to the registry by attnedit.surgery (api.add_builtin)

__all__ = ["BUILTIN", "DEFAULT_SWA_FORMAT", "GateSWATarget", "MLATarget"]
