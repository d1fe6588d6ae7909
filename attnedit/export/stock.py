"""Export a GateSWA model without gate or sinks as a plain stock hybrid sliding-window checkpoint.

A GateSWA model converted with ``gate=none`` and ``sink=0`` is exactly the teacher's architecture with
some layers restricted to a sliding window: transformers (and vLLM, SGLang) run that natively for the
families whose config carries a per-layer ``layer_types`` list (``sliding_attention`` /
``full_attention``) next to one ``sliding_window``. The window means the same thing in both: a query
at position ``q`` sees keys ``k`` with ``q - window < k <= q`` (transformers' ``sliding_window_overlay``
is ``kv_idx > q_idx - sliding_window``; attnedit's mask is ``k > q - window``), so
``sliding_window = window``.

Formats, and the teachers each can take:

============  ======================  ==========================================================
format        teachers                why
============  ======================  ==========================================================
ministral     llama, mistral          Llama's math (no biases, no QK-norm) with ``layer_types``;
                                      the default for Llama (SmolLM2) and Mistral teachers
qwen2         qwen2, llama, mistral   q/k/v biases always present (zeros for Llama/Mistral), no
                                      o bias, no QK-norm; the default for Qwen2 teachers
qwen3         qwen3                   QK-norm; transformers reads ``layer_types``, vLLM/SGLang do not
qwen3_moe     qwen3_moe               one ``sliding_window`` for *every* layer (no ``layer_types``):
                                      all-sliding (``full_layers=none``) or all-full models only
gemma2,       gemma2, gemma3, olmo3   the teacher's own config with ``layer_types``; one window for
gemma3_text,                          every sliding layer (the teacher's, which GateSWA keeps on
olmo3                                 the layers that slid already)
============  ======================  ==========================================================

A model that keeps some KV heads full inside sliding layers (``full_kv_heads``) has no stock format: every
format above has one window per layer, so such a model exports with remote code (``--format hf``) only.

GQA models (fewer KV heads) are the teacher's own architecture: :func:`export_teacher_format` writes the
teacher's config with the smaller ``num_key_value_heads`` (format ``teacher``), for any family.

``layer_types`` is always written explicitly (never derived from Qwen's ``max_window_layers``, which
counts the layers that do *not* slide).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import AttnEditError
from ..surgery.builtin import DEFAULT_SWA_FORMAT
from .write import write_stock

SWA_FORMATS: dict[str, tuple[str, ...]] = {
    "ministral": ("llama", "mistral", "ministral"),
    "qwen2": ("qwen2", "llama", "mistral"),
    "qwen3": ("qwen3",),
    "qwen3_moe": ("qwen3_moe",),
    "gemma2": ("gemma2",),
    "gemma3_text": ("gemma3",),
    "olmo3": ("olmo3",),
}
STOCK_CLASSES = {
    "ministral": ("MinistralConfig", "MinistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM"),
}
# fields a cross-family export carries over from the teacher's config (same-family exports keep them all)
_CARRIED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_DROPPED = ("architectures", "model_type", "transformers_version", "auto_map", "_name_or_path", "layer_types", "dtype", "torch_dtype")


def model_target(model) -> str:
    """``mla``, ``gateswa``, ``gqa`` (an outside target's name) or ``dense`` (nothing edited): what the model's
    layers were converted to."""
    target = (getattr(model.config, "edit", None) or {}).get("target")
    if target and target != "none":
        return target
    kinds = {x["kind"] for x in model.config.layer_attention}
    return "mla" if "mla" in kinds else "gateswa" if "gateswa" in kinds else "dense"


def swa_layout(model, fmt: str) -> tuple[list[str], int | None]:
    """Per-layer ``layer_types`` and the one ``sliding_window``, or a one-line error saying what prevents it."""
    cfg = model.config
    split = [i for i, x in enumerate(cfg.layer_attention) if x.get("layer_type") == "sliding" and x.get("full_kv_heads")]
    if split:
        raise AttnEditError(
            f"this GateSWA model keeps some KV heads full inside sliding layers ({', '.join(map(str, split))}) and no stock "
            f"format, {fmt} included, has a window per head: export --format hf (remote code)"
        )
    gates = sorted({x.get("gate") for x in cfg.layer_attention if x["kind"] == "gateswa" and x.get("gate") != "none"})
    sinks = sorted({x.get("sink", 0) for x in cfg.layer_attention if x.get("sink", 0)})
    if gates or sinks:
        wrong = ([f"gate={gates[0]} (the stock format has no output gate: gate must be none)"] if gates else []) + (
            [f"sink={sinks[0]} (stock sliding windows have no attention sinks: sink must be 0)"] if sinks else []
        )
        raise AttnEditError(
            f"this GateSWA model cannot be a stock {fmt} checkpoint: it has {' and '.join(wrong)}; "
            "convert with --set gate=none --set sink=0, or export --format hf (remote code)"
        )
    layer_types, windows = [], set()
    for x in cfg.layer_attention:
        window = x.get("window") if (x["kind"] == "dense" or x.get("layer_type") == "sliding") else None
        layer_types.append("full_attention" if window is None else "sliding_attention")
        if window is not None:
            windows.add(int(window))
    if len(windows) > 1:
        raise AttnEditError(f"stock {fmt} has one sliding_window for all sliding layers; this model's layers use {sorted(windows)}")
    return layer_types, (windows.pop() if windows else None)


def stock_swa_config(model, fmt: str | None = None) -> tuple[str, dict]:
    """The stock format and its config (a dict for the format's config class) for a gate-less GateSWA model."""
    cfg = model.config
    target = model_target(model)
    if target == "mla":
        raise AttnEditError(
            f"this model is MLA; the sliding-window formats ({', '.join(SWA_FORMATS)}) take GateSWA models "
            "(gate=none, sink=0). Export it with --format deepseek_v3 (stock) or --format hf (remote code)"
        )
    family = cfg.family
    fmt = fmt or DEFAULT_SWA_FORMAT.get(family)
    if fmt not in SWA_FORMATS:
        raise AttnEditError(f"unknown sliding-window format {fmt!r}; choose one of: {', '.join(SWA_FORMATS)}")
    if family not in SWA_FORMATS[fmt]:
        takes = [f for f, fams in SWA_FORMATS.items() if family in fams]
        raise AttnEditError(f"a {family} model cannot be written as stock {fmt}; its formats: {', '.join(takes + ['hf'])}")
    layer_types, window = swa_layout(model, fmt)
    base = dict(cfg.base_config)
    spec = cfg.teacher_attention
    if base.get("mlp_bias", False) or spec["o_bias"]:
        raise AttnEditError(f"stock {fmt} has no {'MLP' if base.get('mlp_bias') else 'o_proj'} bias; this {family} teacher has one")
    if fmt == "ministral" and spec["qkv_bias"]:
        raise AttnEditError("stock ministral has no q/k/v biases; this teacher has them: export --format qwen2")
    if fmt == base.get("model_type"):  # same family: the teacher's own config, every field exact (QK-norm, MoE, RoPE)
        out = {k: v for k, v in base.items() if k not in _DROPPED}
    else:
        out = {k: base[k] for k in _CARRIED if k in base}
        out["head_dim"] = spec["head_dim"]
    out["tie_word_embeddings"] = bool(cfg.tie_word_embeddings)
    out["sliding_window"] = window
    if fmt == "qwen3_moe":
        if len(set(layer_types)) > 1:
            full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
            raise AttnEditError(
                f"stock qwen3_moe has one sliding_window for every layer (no per-layer layer_types; qwen2_moe has "
                f"them but no QK-norm), and this model keeps layers {full} full: convert with full_layers=none, "
                "or export --format hf"
            )
        out["use_sliding_window"] = window is not None
        out.pop("max_window_layers", None)
    else:
        out["layer_types"] = layer_types
        if fmt in ("qwen2", "qwen3"):
            out["use_sliding_window"] = window is not None  # Qwen configs drop sliding_window without it
            # unused when layer_types is given; an engine that still reads it (layer i slides iff
            # i >= max_window_layers) then runs every layer full instead of an arbitrary mix
            out["max_window_layers"] = len(layer_types)
    return fmt, out


def stock_swa_state_dict(model, fmt: str, config: dict) -> dict[str, torch.Tensor]:
    """The model's weights under the stock names (they are the same), with zero q/k/v biases where the
    stock class has them and the teacher did not (Llama/Mistral -> qwen2)."""
    out = {}
    for name, t in model.state_dict().items():
        if config["tie_word_embeddings"] and name == "lm_head.weight":
            continue
        out[name] = t.detach().cpu().contiguous()
    if fmt == "qwen2" and not model.config.teacher_attention["qkv_bias"]:
        for i in range(config["num_hidden_layers"]):
            for p in ("q_proj", "k_proj", "v_proj"):
                w = out[f"model.layers.{i}.self_attn.{p}.weight"]
                out[f"model.layers.{i}.self_attn.{p}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out


def export_stock_swa(model, out_dir: str | os.PathLike, fmt: str | None = None, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a ``gate=none, sink=0`` GateSWA model as a stock hybrid sliding-window checkpoint (no remote code)."""
    import transformers

    fmt, config = stock_swa_config(model, fmt)
    config_cls, model_cls = (getattr(transformers, n) for n in STOCK_CLASSES[fmt])
    state = stock_swa_state_dict(model, fmt, config)
    return write_stock(model, model_cls, config_cls(**config), state, out_dir, tokenizer, overwrite)


def teacher_format_config(model) -> dict:
    """The teacher's own config (a dict for its config class) with the GQA model's ``num_key_value_heads``,
    or a one-line error saying what prevents a stock checkpoint."""
    cfg = model.config
    heads = {x.get("num_kv_heads") if x["kind"] == "gqa" else cfg.teacher_attention["num_kv_heads"] for x in cfg.layer_attention}
    other = sorted({x["kind"] for x in cfg.layer_attention} - {"gqa", "dense"})
    if other:
        raise AttnEditError(f"format teacher writes GQA models (fewer KV heads); this model has {other[0]} layers: export --format hf")
    if len(heads) > 1:
        raise AttnEditError(
            f"a stock checkpoint has one num_key_value_heads for every layer; this model's layers have {sorted(heads)} "
            "(convert every layer: layers=all), or export --format hf"
        )
    windows = [x.get("window") for x in cfg.layer_attention]
    family = _family(cfg)
    if windows != [family.window(_teacher_config(cfg), i) for i in range(len(windows))]:
        raise AttnEditError("this model's sliding windows are not the teacher's: export --format hf")
    out = {k: v for k, v in cfg.base_config.items() if k not in ("architectures", "transformers_version", "auto_map", "_name_or_path", "dtype", "torch_dtype")}
    out["num_key_value_heads"] = heads.pop()
    out["tie_word_embeddings"] = bool(cfg.tie_word_embeddings)
    return out


def _family(cfg):
    from ..families import FAMILIES

    return FAMILIES[cfg.family]


def _teacher_config(cfg):
    from ..targets.modeling_attnedit import base_config_object

    return base_config_object(cfg.base_config)


def export_teacher_format(model, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a GQA model as a stock checkpoint of its teacher's model type with fewer KV heads (no remote code).
    A fused q/k/v teacher (Phi-3) gets its ``qkv_proj`` back."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = teacher_format_config(model)
    stock_config = AutoConfig.for_model(**config)
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(stock_config)]
    state = {}
    for name, t in model.state_dict().items():
        if config["tie_word_embeddings"] and name == "lm_head.weight":
            continue
        state[name] = t.detach().cpu().contiguous()
    fused = getattr(_family(model.config), "fused_qkv", None)
    if fused:
        for i in range(model.config.num_hidden_layers):
            prefix = f"model.layers.{i}.self_attn."
            for kind in ("weight", "bias"):
                parts = [state.pop(f"{prefix}{p}.{kind}", None) for p in ("q_proj", "k_proj", "v_proj")]
                if parts[0] is not None:
                    state[f"{prefix}{fused}.{kind}"] = torch.cat(parts)
    return write_stock(model, model_cls, stock_config, state, out_dir, tokenizer, overwrite)
