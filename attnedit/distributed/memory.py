"""The per-GPU memory plan of a conversion on N GPUs, from configs alone (no weights are read).

For each stage and each rank: frozen weights (the teacher, shared with the student), trained weights
(fp32 master copies), their gradients (fp32), AdamW state (two fp32 moments), activations of one
micro-batch of ``batch_size / N`` sequences, and buffers (FSDP2's all-gathered units: the unit in use
and the one prefetched). Frozen weights are replicated when that fits and sharded per decoder layer
otherwise (see :mod:`.fsdp`); trained weights, gradients and AdamW state are always sharded.

Activations are estimates of what one micro-batch keeps for the backward pass with the recipe's
settings (fused attention on GPU, so no ``T x T`` scores; gradient checkpointing keeps one layer's
input per layer plus one layer's internals). An MoE layer's MLP activations count only the routed
``num_experts_per_tok`` experts per token and the router's logits: no expert runs on tokens not routed
to it, so memory and time do not grow with the number of experts (the experts' *weights* do, and are
what sharding spreads). A margin covers the CUDA context and allocator slack.
"""

from __future__ import annotations

import torch

GiB = 1024**3
CONTEXT_BYTES = 1.0 * GiB  # CUDA context, cuBLAS workspaces, NCCL buffers
SLACK = 0.10  # allocator fragmentation, on top of the estimate
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)


def _teacher_parts(config) -> dict:
    """Teacher parameter counts by kind: embed, head, attention, mlp (router and experts), norms."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parts = {"embed": 0, "head": 0, "attention": 0, "mlp": 0, "norms": 0, "largest_layer_frozen": 0}
    seen, per_layer = set(), {}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if ".self_attn." in name and "norm" not in name:
            kind = "attention"
        elif ".mlp." in name:
            kind = "mlp"
        elif "embed_tokens" in name:
            kind = "embed"
        elif name.startswith("lm_head"):
            kind = "head"
        else:
            kind = "norms"
        parts[kind] += n
        if kind in ("attention", "mlp"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            per_layer[layer] = per_layer.get(layer, 0) + n
    parts["largest_layer_frozen"] = max(per_layer.values(), default=0)
    return parts


def _new_attention(config, recipe) -> tuple[int, int, int]:
    """(new params, edited layer count, largest new attention) of the edited model."""
    from ..stages import stage1
    from ..surgery import edited_config
    from ..targets import AttnEditForCausalLM

    edited = edited_config(config, recipe.target, recipe.target_args)
    with torch.device("meta"):
        meta = AttnEditForCausalLM(edited)
    layers = edited.edit["edited_layers"]
    per = [sum(p.numel() for p in meta.attentions()[i].parameters()) for i in layers]
    return sum(per), len(layers), max(per, default=0)


def _mlp_width(config) -> tuple[int, int]:
    """(activated MLP width per token, router outputs per token)."""
    experts = getattr(config, "num_experts", 0) or 0
    if experts:
        return config.moe_intermediate_size * config.num_experts_per_tok, experts
    return config.intermediate_size, 0


def _activations(config, recipe, stage: int, micro: int, n_edited: int, abytes: int) -> int:
    from ..stages.convert import stage_seq_len
    from ..stages.plan import FP32, KD_VOCAB_TENSORS, LAYER_SAVED, MLP_SAVED, STAGE1_CAPTURED, STAGE1_SAVED

    cfg = recipe.stage1 if stage == 1 else recipe.stage2
    t, h = stage_seq_len(recipe, stage), config.hidden_size
    tokens = micro * t
    if stage == 1:
        # the teacher's captured input and output of every edited layer, and each new attention's
        # internals kept for its backward (q, k, v, latent, outputs: ~12 hidden widths)
        return n_edited * tokens * h * (STAGE1_CAPTURED + STAGE1_SAVED) * abytes
    width, router = _mlp_width(config)
    layer = tokens * (LAYER_SAVED * h + MLP_SAVED * width + router) * abytes  # one layer's internals kept for backward
    layers = config.num_hidden_layers
    kept = layers * tokens * h * abytes + layer if cfg.gradient_checkpointing else layers * layer
    teacher = (layers if cfg.feature_weight > 0 else 1) * tokens * h * abytes
    logits = min(cfg.kl_chunk, tokens) * config.vocab_size * FP32 * KD_VOCAB_TENSORS  # fp32 chunk: logits, softmaxes, grads
    return kept + teacher + logits


def plan_memory(config, recipe, world_size: int, gpu_bytes: float | None = None, frozen: str = "auto") -> dict:
    """Per-rank bytes of each stage on ``world_size`` GPUs; ``frozen``: replicate, shard or auto."""
    from ..stages import stage2  # noqa: F401  (the trainable sets below follow stage2.trainable)
    from ..stages.convert import stage_seq_len

    def use_bf16(device, precision: str) -> bool:  # the plan is for bf16-capable GPUs (A100, H100, H200)
        return precision != "fp32"

    device = torch.device("cuda")
    parts = _teacher_parts(config)
    new, n_edited, largest_new = _new_attention(config, recipe)
    bf16_all = all(use_bf16(device, s.precision) for s in (recipe.stage1, recipe.stage2))
    wb = 2 if (recipe.weights_dtype == "auto" and bf16_all) or recipe.weights_dtype == "bfloat16" else 4
    tied = parts["head"] == 0
    whole = (parts["embed"] + parts["head"] + parts["norms"]) * wb
    layered = (parts["attention"] + parts["mlp"]) * wb
    modes = ("replicate", "shard") if frozen == "auto" else (frozen,)
    out = {"world_size": world_size, "gpu_bytes": gpu_bytes, "params": {**parts, "new_attention": new, "tied_head": tied}}
    options = {}
    for mode in modes:
        n = world_size
        stages = []
        for stage in (1, 2):
            cfg = recipe.stage1 if stage == 1 else recipe.stage2
            if cfg.steps == 0:
                continue
            trained = new
            if stage == 2 and cfg.trainable == "attention+norms":
                trained += parts["norms"]
            elif stage == 2 and cfg.trainable == "all":
                trained = new + parts["embed"] + parts["head"] + parts["norms"] + parts["mlp"]
            micro = max(1, cfg.batch_size // n)
            ab = 2 if use_bf16(device, cfg.precision) else 4
            row = {
                "stage": stage,
                "micro_batch": f"{micro} x {stage_seq_len(recipe, stage)}",
                "frozen_weights": whole + (layered / n if mode == "shard" else layered),
                "trained_weights": trained * 4 / n,
                "grads": trained * 4 / n,
                "optimizer": trained * 8 / n,
                "activations": _activations(config, recipe, stage, micro, n_edited, ab),
                # FSDP2 buffers: the all-gathered unit in use and the prefetched next one
                "buffers": 2 * (largest_new * 4 + (parts["largest_layer_frozen"] * wb if mode == "shard" and n > 1 else 0)),
            }
            est = sum(row[k] for k in ("frozen_weights", "trained_weights", "grads", "optimizer", "activations", "buffers"))
            row["total"] = est * (1 + SLACK) + CONTEXT_BYTES
            stages.append(row)
        peak = max((s["total"] for s in stages), default=0)
        options[mode] = {"stages": stages, "peak": peak, "fits": gpu_bytes is None or peak <= gpu_bytes}
    out["options"] = options
    fitting = [m for m in modes if options[m]["fits"]]
    out["frozen"] = fitting[0] if fitting else modes[-1]
    out["fits"] = bool(fitting)
    return out


def smallest_world(config, recipe, gpu_bytes: float, frozen: str = "auto") -> tuple[int | None, str | None]:
    """The fewest GPUs of ``gpu_bytes`` each on which every stage fits, and the frozen-weight mode then."""
    for n in WORLD_SIZES:
        p = plan_memory(config, recipe, n, gpu_bytes, frozen)
        if p["fits"]:
            return n, p["frozen"]
    return None, None


def frozen_decision(config, recipe, world: int) -> bool:
    """Whether this run shards its frozen weights: ``ATTNEDIT_FROZEN`` (replicate, shard), or, by
    default, only when replicated ones do not fit this GPU (never on CPU)."""
    from .fsdp import frozen_mode

    mode = frozen_mode()
    if mode != "auto":
        return mode == "shard"
    if not torch.cuda.is_available() or world == 1:
        return False
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return plan_memory(config, recipe, world, total, "auto")["frozen"] == "shard"


def format_memory_plan(plan: dict, smallest: tuple[int | None, str | None] | None = None) -> str:
    from ..tables import human_bytes, text_table

    n = plan["world_size"]
    lines = [f"memory per GPU on {n} GPU(s) (bf16 frozen weights, fp32 trained weights + AdamW; estimates)"]
    for mode, opt in plan["options"].items():
        rows = [
            [f"stage {s['stage']}", s["micro_batch"], *(human_bytes(s[k]) for k in
             ("frozen_weights", "trained_weights", "grads", "optimizer", "activations", "buffers", "total"))]
            for s in opt["stages"]
        ]  # fmt: skip
        fits = "" if plan["gpu_bytes"] is None else (" fits" if opt["fits"] else " does NOT fit")
        lines.append(f"\nfrozen weights {mode.replace('shard', 'sharde')}d{fits}" + (f" in {human_bytes(plan['gpu_bytes'])}" if plan["gpu_bytes"] else ""))
        headers = ["stage", "micro-batch/rank", "frozen", "trained", "grads", "AdamW", "activations", "FSDP buffers", "total"]
        lines.append(text_table(headers, rows, right=set(range(2, 9))))
    if smallest is not None:
        k, mode = smallest
        gpu = human_bytes(plan["gpu_bytes"])
        lines.append(
            f"\nsmallest GPU count that fits {gpu}: {k} (frozen weights {mode.replace('shard', 'sharde')}d)" if k else f"\nno GPU count up to {WORLD_SIZES[-1]} fits {gpu}"
        )
    return "\n".join(lines)
