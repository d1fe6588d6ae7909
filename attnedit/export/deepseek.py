"""Export an all-MLA model as a stock DeepSeek-V3 checkpoint (``model_type: deepseek_v3``).

vLLM keys native MLA serving on ``model_type: deepseek_v3``, SGLang on ``architectures:
["DeepseekV3ForCausalLM"]``; transformers loads it without remote code. Conditions: every layer is
MLA, and the teacher's MLP is the gated SiLU MLP that DeepSeek's dense layers use (Llama, Mistral,
Qwen2, Qwen3; not MoE teachers, whose experts DeepSeek routes differently). All layers are dense
(``first_k_dense_replace = num_hidden_layers``). DeepSeek's RoPE is interleaved (pairs ``(2i, 2i+1)``)
where attnedit's, like Llama's, is half-split (pairs ``(i, i + d/2)``): the RoPE rows of the query
and of ``kv_a_proj_with_mqa`` are permuted and ``rope_interleave: true`` is set. A parity test loads
the export with ``DeepseekV3ForCausalLM`` and compares logits with the attnedit model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import AttnEditError
from .write import write_stock

DENSE_MLP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _interleave_rows(w: torch.Tensor, start: int, rope: int, group: int, n_groups: int) -> torch.Tensor:
    """Permute the ``rope`` rows at ``start`` of each ``group``-row block from half-split to interleaved."""
    w = w.clone()
    half = torch.arange(rope // 2)
    order = torch.stack([half, half + rope // 2], dim=1).flatten()  # new row 2i <- i, 2i+1 <- i + rope/2
    for g in range(n_groups):
        rows = w[g * group + start : g * group + start + rope]
        w[g * group + start : g * group + start + rope] = rows[order]
    return w


def deepseek_v3_config(model) -> dict:
    cfg = model.config
    layers = cfg.layer_attention
    if any(x["kind"] == "gateswa" for x in layers):
        from .stock import SWA_FORMATS

        swa = " or ".join(f for f, families in SWA_FORMATS.items() if cfg.family in families)
        raise AttnEditError(
            "this model is GateSWA, not MLA: deepseek_v3 takes all-MLA models. Export it with --format hf (remote code)"
            + (f", or --format {swa} (stock sliding-window, needs gate=none and sink=0)" if swa else "")
        )
    not_mla = [i for i, x in enumerate(layers) if x["kind"] != "mla"]
    if not_mla:
        raise AttnEditError(f"deepseek_v3 export needs every layer converted to MLA; layers {not_mla} are not (edit with layers=all)")
    if cfg.family not in DENSE_MLP_FAMILIES:
        raise AttnEditError(f"deepseek_v3 export supports teachers with dense MLPs ({', '.join(DENSE_MLP_FAMILIES)}), not {cfg.family}")
    if any(x != layers[0] for x in layers):
        ranks = {x.get("kv_lora_rank") for x in layers}
        hint = " (each layer has its own kv_lora_rank: convert with rank_allocation=uniform to export)" if len(ranks) > 1 else ""
        raise AttnEditError("deepseek_v3 export needs the same MLA dimensions in every layer" + hint)
    base = cfg.base_config
    if base.get("hidden_act", "silu") != "silu" or base.get("mlp_bias", False):
        raise AttnEditError("deepseek_v3 export needs a SiLU-gated MLP without biases")
    mla = layers[0]
    heads = cfg.teacher_attention["num_heads"]
    rope_parameters = dict(base.get("rope_parameters") or {"rope_type": "default", "rope_theta": base.get("rope_theta", 10000.0)})
    if mla.get("rope_theta") is not None:
        rope_parameters["rope_theta"] = mla["rope_theta"]
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": base["intermediate_size"],
        "moe_intermediate_size": base["intermediate_size"],
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "n_shared_experts": 1,
        "n_routed_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": cfg.num_hidden_layers,
        "kv_lora_rank": mla["kv_lora_rank"],
        "q_lora_rank": mla["q_lora_rank"],
        "qk_rope_head_dim": mla["qk_rope_head_dim"],
        "qk_nope_head_dim": mla["qk_nope_head_dim"],
        "v_head_dim": mla["v_head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": base.get("max_position_embeddings", 4096),
        "rms_norm_eps": base.get("rms_norm_eps", 1e-6),
        "rope_parameters": rope_parameters,
        "rope_interleave": True,
        "attention_bias": False,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "bos_token_id": base.get("bos_token_id"),
        "eos_token_id": base.get("eos_token_id"),
        "pad_token_id": base.get("pad_token_id"),
        "num_mtp_layers": 0,
    }


def deepseek_v3_state_dict(model, config: dict) -> dict[str, torch.Tensor]:
    heads, nope, rope = config["num_attention_heads"], config["qk_nope_head_dim"], config["qk_rope_head_dim"]
    rank = config["kv_lora_rank"]
    out = {}
    for name, t in model.state_dict().items():
        if config["tie_word_embeddings"] and name == "lm_head.weight":
            continue
        t = t.detach().cpu()
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            t = _interleave_rows(t, nope, rope, nope + rope, heads)
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            t = _interleave_rows(t, rank, rope, t.shape[0], 1)
        out[name] = t.contiguous()
    return out


def export_deepseek_v3(model, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``model`` as a DeepSeek-V3 checkpoint loadable by transformers, vLLM and SGLang."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    if any(layer.get("kind") == "mla" and layer.get("bias") for layer in model.config.layer_attention):
        raise AttnEditError(
            "this MLA model has attention biases (bias=true, or auto with a Qwen2-family teacher), which "
            "stock DeepSeek-V3 cannot hold; convert with --set bias=false, or export --format hf"
        )
    config = deepseek_v3_config(model)
    state = deepseek_v3_state_dict(model, config)
    ds_config = DeepseekV3Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    return write_stock(model, DeepseekV3ForCausalLM, ds_config, state, out_dir, tokenizer, overwrite)
