"""What ``convert`` will do, from configs alone (no weights are loaded): the ``--dry-run`` plan.

The plan resolves the run's settings (device, frozen-weights dtype, each stage's sequence length and
batch), counts the parameters that train, reads the KV figures from :mod:`attnedit.eval.kv`, and
estimates each stage's peak memory. ``convert`` uses the same estimate for ``est_memory_bytes`` in
``summary.json``, next to the measured peak.
"""

from __future__ import annotations

import dataclasses

import torch

from ..data.recall import spans_fit
from ..devices import resolve_device, use_bf16
from ..errors import AttnEditError
from ..recipe import Recipe, StageConfig

# The memory estimate (bytes). A rough upper figure, checked against measured peaks on the GPU
# (tools/gpu/train_speed.sh); each constant says what it counts.
FP32 = 4  # bytes of an fp32 value: trained weights are fp32 master copies, and so are their gradients
ADAMW_STATE = 12  # bytes per trained parameter besides the weight: fp32 gradient + AdamW's two moments
STAGE1_CAPTURED = 2  # hidden-sized tensors stage 1 keeps per edited layer: the teacher's x_i and y_i
STAGE1_SAVED = 9  # hidden-sized tensors one edited attention saves for backward (q, k, v, rotations, output);
# calibrated on an H100: SmolLM2 -> MLA at 16 x 1024 peaked at 5.4 GiB (6.4 under torchrun), estimate 6.5
SCORE_TENSORS = 2  # t x t tensors per head (scores and probabilities) on CPU, which has no fused kernel
LAYER_SAVED = 10  # hidden-sized tensors a decoder layer saves for backward (norms, q/k/v/o, residuals)
MLP_SAVED = 3  # intermediate-sized tensors of its MLP (gate, up, activation, product; one is recomputed);
# LAYER_SAVED and MLP_SAVED calibrated on an H100: SmolLM2 -> MLA stage 2 at 8 x 2048 peaked at 11.1 GiB;
# an MLA layer saves more: see attention_extra_width (at 16 x 2048, 21.35 GiB measured against 20.54 without it)
MLP_RATIO = 4  # intermediate / hidden size when the config does not say
KD_VOCAB_TENSORS = 5  # vocabulary-sized fp32 tensors per KD chunk (two logits, two softmaxes, gradient)
KV_CONTEXT = 8192  # the plan's KV figures are at this context (or the run's seq_len, if longer)


def stage_config(recipe: Recipe, stage: int) -> StageConfig:
    return recipe.stage1 if stage == 1 else recipe.stage2


def stage_seq_len(recipe: Recipe, stage: int) -> int:
    return stage_config(recipe, stage).seq_len or recipe.data.seq_len


def stage_data(recipe: Recipe, seq_len: int):
    """The data settings at ``seq_len``, holding out at least the documents of the held-out blocks
    (counted at ``data.seq_len``)."""
    held = -(-recipe.data.heldout_blocks * recipe.data.seq_len // seq_len)
    return dataclasses.replace(recipe.data, seq_len=seq_len, heldout_blocks=held)


def weights_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """Frozen weights in bf16 only when every stage computes in bf16 (fp32 math cannot take bf16 weights)."""
    if recipe.weights_dtype != "auto":
        return getattr(torch, recipe.weights_dtype)
    bf16 = all(use_bf16(device, s.precision) for s in (recipe.stage1, recipe.stage2))
    return torch.bfloat16 if bf16 else torch.float32


def check_seq_len(recipe: Recipe, config) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    longest = max(recipe.data.seq_len, stage_seq_len(recipe, 1), stage_seq_len(recipe, 2))
    if limit and longest > limit:
        raise AttnEditError(
            f"seq_len {longest} is above the teacher's max_position_embeddings {limit}; lower data.seq_len / stageN.seq_len"
        )


def validate_start(recipe: Recipe) -> None:
    """What can fail from configs and files alone (family, target settings, seq_len, data files, device, the
    eval section's data and contexts), checked before a new run folder is written."""
    from ..data import check_files
    from ..surgery import edited_config
    from ..teachers import load_config

    from .evaluate import check_eval

    config = load_config(recipe.teacher)
    check_seq_len(recipe, config)
    edited_config(config, recipe.target, recipe.target_args)
    check_files(recipe.data)
    resolve_device(recipe.device)
    check_eval(recipe, config)


def attention_extra_width(edited) -> int:
    """Values per token that an edited model's attentions save for stage 2's backward beyond the teacher's,
    summed over its layers: an MLA layer up-projects its latent to every head's K (no-RoPE part) and V
    (``kv_b_proj``, heads x (nope + v) wide) where the teacher keeps grouped K and V (2 x kv heads x head dim).
    Read from the edited config's attention spec and layer list, as the KV figures are (``eval/kv.py``)."""
    spec = edited.teacher_attention
    kv = 2 * spec["num_kv_heads"] * spec["head_dim"]
    up = [spec["num_heads"] * (x["qk_nope_head_dim"] + x["v_head_dim"]) for x in edited.layer_attention if x["kind"] == "mla"]
    return sum(max(0, w - kv) for w in up)


def activation_bytes(recipe: Recipe, stage: int, config, n_edited: int, abytes: int, device: torch.device, extra_width: int = 0) -> float:
    """A rough upper figure for the activations one micro-batch keeps for the backward pass; ``extra_width``:
    :func:`attention_extra_width` (stage 2)."""
    cfg = stage_config(recipe, stage)
    b, t = cfg.batch_size, stage_seq_len(recipe, stage)
    h, heads = config.hidden_size, config.num_attention_heads
    inter = getattr(config, "intermediate_size", MLP_RATIO * h)
    scores = b * heads * t * t * SCORE_TENSORS * abytes if device.type == "cpu" else 0
    if stage == 1:
        return n_edited * (b * t * h * (STAGE1_CAPTURED * abytes + STAGE1_SAVED * abytes) + scores)
    layers = config.num_hidden_layers
    logits = min(cfg.kl_chunk, b * t) * config.vocab_size * FP32 * KD_VOCAB_TENSORS
    return layers * (b * t * (LAYER_SAVED * h + MLP_SAVED * inter) * abytes + scores) + b * t * extra_width * abytes + logits


def memory_bytes(teacher_params: int, new_params: int, trainable: int, wbytes: int, activations: float) -> float:
    """Frozen teacher weights + fp32 new attention + fp32 copies of the teacher modules stage 2 trains
    + gradients and optimizer state of everything that trains + activations."""
    copies = (trainable - new_params) * FP32
    return teacher_params * wbytes + new_params * FP32 + copies + trainable * ADAMW_STATE + activations


def make_plan(recipe: Recipe) -> dict:
    """The ``--dry-run`` plan of ``recipe`` (a dict; :func:`attnedit.stages.format.format_plan` prints it)."""
    from ..data import check_files
    from ..eval.inspect import count_parameters
    from ..eval.kv import kv_summary
    from ..surgery import edited_config
    from ..targets import AttnEditForCausalLM
    from ..teachers import load_config
    from . import stage1, stage2
    from .evaluate import describe

    config = load_config(recipe.teacher)
    check_seq_len(recipe, config)
    edited = edited_config(config, recipe.target, recipe.target_args)
    files = check_files(recipe.data)
    device = resolve_device(recipe.device)
    wdtype = weights_dtype(recipe, device)
    with torch.device("meta"):
        meta = AttnEditForCausalLM(edited)
    layers = edited.edit["edited_layers"]
    new_params = sum(p.numel() for _, p in stage1.trainable(meta))
    teacher_params = count_parameters(config)
    context = max(recipe.data.seq_len, KV_CONTEXT)
    kv_t, kv_s = kv_summary(config, context, "bfloat16"), kv_summary(edited, context, "bfloat16")
    wbytes = torch.finfo(wdtype).bits // 8
    extra = attention_extra_width(edited)
    stages = []
    for n in (1, 2):
        cfg = stage_config(recipe, n)
        trainable = new_params if n == 1 else sum(p.numel() for _, p in stage2.trainable(meta, cfg.trainable))
        bf16 = use_bf16(device, cfg.precision)
        activations = activation_bytes(recipe, n, config, len(layers), 2 if bf16 else 4, device, extra)
        seq = stage_seq_len(recipe, n)
        stages.append(
            {
                "stage": n,
                "steps": cfg.steps,
                "batch": f"{cfg.batch_size} x {cfg.grad_accum} x {seq}",
                "tokens": cfg.steps * cfg.batch_size * cfg.grad_accum * seq,
                "lr": f"{cfg.lr:g} ({cfg.schedule}, warmup {cfg.warmup}, min {cfg.min_lr:g})",
                "trainable_params": trainable if cfg.steps else 0,
                "precision": "bf16" if bf16 else "fp32",
                "memory_bytes": memory_bytes(teacher_params, new_params, trainable, wbytes, activations) if cfg.steps else 0,
            }
        )
    return {
        "teacher": recipe.teacher,
        "family": config.model_type,
        "teacher_params": teacher_params,
        "num_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "target": recipe.target,
        "target_args": recipe.target_args,
        "edited_layers": layers,
        "new_params": new_params,
        "replaced_params": sum(x["params"] for x in kv_t["layers"] if x["layer"] in layers),
        "kv_context": context,
        "kv_bytes_per_token": {"teacher": kv_t["kv_bytes_per_token"], "edited": kv_s["kv_bytes_per_token"]},
        "data_files": [str(f) for f in files],
        "seq_len": recipe.data.seq_len,
        "recall_fraction": recipe.stage2.recall_fraction if recipe.stage2.steps and spans_fit(stage_seq_len(recipe, 2)) else 0.0,
        "device": str(device),
        "weights_dtype": str(wdtype).replace("torch.", ""),
        "stages": stages,
        "checkpoint_every": recipe.checkpoint_every,
        "eval": describe(recipe.eval),
    }


def estimated_memory(recipe: Recipe, stage: int) -> float:
    """The ``--dry-run`` memory estimate of ``stage`` (bytes), for ``summary.json``."""
    return next(s["memory_bytes"] for s in make_plan(recipe)["stages"] if s["stage"] == stage)
