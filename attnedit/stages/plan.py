"""What ``convert`` will do, from configs alone (no weights are loaded): the stages, the ``--dry-run`` plan,
and each stage fitted to the GPU's memory.

The plan resolves the run's settings (device, frozen-weights dtype, each stage's sequence length and
batch), counts the parameters that train, reads the KV figures from :mod:`attnedit.eval.kv`, and
lays the stages out with the strategy's one memory model (:mod:`attnedit.distributed.memory`). When a
stage does not fit the GPU (its total memory; ``--gpu-memory`` in a dry run), the stage runs at the
largest micro-batch that fits, with gradient accumulation raised to keep the recipe's global batch
(and gradient checkpointing on in stage 2 where no micro-batch fits without it); ``convert`` runs the
stages exactly as :func:`fit_stages` lays them out, and a recipe that fits at no micro-batch is refused
before training with one line saying what would fit.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import torch

from ..data.recall import spans_fit
from ..devices import resolve_device, use_bf16
from ..distributed import FSDP2, Parallelism
from ..distributed.memory import GiB, Layout, ModelSizes, StageLoad, adapted, checkpointing_text, device_memory, fit, fit_order, fits, model_sizes, stage_bytes
from ..errors import AttnEditError
from ..recipe import Recipe
from ..targets.common import first_line
from .base import Stage
from .stage1 import Stage1
from .stage2 import Stage2

KV_CONTEXT = 8192  # the plan's KV figures are at this context (or the run's seq_len, if longer; the teacher's max, if shorter)
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)  # the GPU counts the plan tries for "what would fit"
DEFAULT_GPU_GIB = 80.0  # a dry run for N GPUs without --gpu-memory plans for 80 GiB cards


def stages(recipe: Recipe) -> list[Stage]:
    """The conversion's stages, in order, as the recipe says them."""
    return [Stage1(recipe.stage1, recipe.data, recipe.seed), Stage2(recipe.stage2, recipe.data, recipe.seed)]


def weights_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """Frozen weights in bf16 only when every stage computes in bf16 (fp32 math cannot take bf16 weights)."""
    if recipe.weights_dtype != "auto":
        return getattr(torch, recipe.weights_dtype)
    bf16 = all(use_bf16(device, s.precision) for s in (recipe.stage1, recipe.stage2))
    return torch.bfloat16 if bf16 else torch.float32


def check_seq_len(recipe: Recipe, config) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    longest = max([recipe.data.seq_len] + [s.seq_len for s in stages(recipe)])
    if limit and longest > limit:
        raise AttnEditError(f"seq_len {longest} is above the teacher's max_position_embeddings {limit}; lower data.seq_len / stageN.seq_len")


def validate_start(recipe: Recipe, parallel: Parallelism | None = None) -> None:
    """What can fail from configs and files alone (family, target settings, seq_len, data files, device, the
    eval section's data and contexts, a stage that fits the GPU at no micro-batch), checked before a new run
    folder is written."""
    from ..data import check_files
    from ..eval.inspect import layout_notes
    from ..surgery import edited_config
    from ..teachers import load_config
    from .evaluate import check_eval

    config = load_config(recipe.teacher)
    check_seq_len(recipe, config)
    edited = edited_config(config, recipe.target, recipe.target_args)
    for note in layout_notes(edited):
        print(f"attnedit: note: {note}", file=sys.stderr)
    check_files(recipe.data)
    device = resolve_device(recipe.device)
    check_eval(recipe, config)
    fit_stages(recipe, config, edited, device, parallel or Parallelism())


# ------------------------------------------------------------------------------------ memory


@dataclasses.dataclass
class MemoryPlan:
    """The stages laid out by a strategy on a device: each stage's memory as the recipe asks it and as it
    will run (fitted to ``gpu_bytes``; None: fits at no micro-batch)."""

    layout: Layout
    gpu_bytes: float | None
    sizes: ModelSizes
    wbytes: int  # bytes of a frozen weight
    loads: dict[int, StageLoad]  # stage number -> what the stage asks (stages that train)
    stages: list[Stage]  # as they will run (those that fit); stages with no steps as the recipe says them
    asked: dict[int, dict]  # stage number -> memory at the recipe's micro-batch
    rows: dict[int, dict | None]  # stage number -> memory as the stage will run
    options: dict[str, dict]  # every layout the strategy offers -> its rows at the recipe's micro-batch

    @property
    def fits(self) -> bool:
        return all(row is not None for row in self.rows.values())

    def adapted(self, number: int) -> bool:
        """Whether stage ``number`` runs otherwise than the recipe says (micro-batch, gradient checkpointing)."""
        row = self.rows.get(number)
        return row is not None and adapted(row, self.loads[number])


def stage_loads(planned: list[Stage], config, edited, device: torch.device) -> list[StageLoad]:
    """What each of ``planned`` that trains asks of memory on ``device``."""
    from ..targets import AttnEditForCausalLM

    with torch.device("meta"):
        meta = AttnEditForCausalLM(edited)
    loads = []
    for stage in planned:
        if not stage.runs:
            continue
        cfg = stage.cfg
        abytes = 2 if use_bf16(device, cfg.precision) else 4

        def activations(micro, recomputed, stage=stage, abytes=abytes):
            return stage.activation_bytes(config, edited, micro, recomputed, device, abytes)

        trained = sum(p.numel() for _, p in stage.trainable(meta))
        layers = config.num_hidden_layers if stage.gradient_checkpointing is not None else 0
        loads.append(StageLoad(stage.number, trained, stage.seq_len, cfg.batch_size, cfg.grad_accum, stage.gradient_checkpointing, activations, layers))
    return loads


def plan_memory(recipe: Recipe, config, edited, device: torch.device, parallel: Parallelism, gpu_bytes: float | None) -> MemoryPlan:
    """Lay the recipe's stages out: the strategy's first layout in which every stage fits at the recipe's
    micro-batch (else its last), then each stage fitted to ``gpu_bytes`` within it (:func:`memory.fit`)."""
    sizes = model_sizes(config, edited)
    wbytes = torch.finfo(weights_dtype(recipe, device)).bits // 8
    planned = stages(recipe)
    loads = stage_loads(planned, config, edited, device)
    options = {}
    for layout in parallel.layouts():
        options[layout.frozen] = {load.stage: stage_bytes(sizes, load, layout, wbytes) for load in loads}
    layouts = parallel.layouts()
    layout = next((lay for lay in layouts if all(fits(r, gpu_bytes) for r in options[lay.frozen].values())), layouts[-1])
    asked = options[layout.frozen]
    rows = {load.stage: fit(sizes, load, layout, wbytes, gpu_bytes) for load in loads}
    plan = MemoryPlan(layout, gpu_bytes, sizes, wbytes, {load.stage: load for load in loads}, [], asked, rows, options)
    for stage in planned:
        if plan.adapted(stage.number):
            row = rows[stage.number]
            stage = stage.fitted(row["batch_size"], row["grad_accum"], row["recomputed_layers"])
        plan.stages.append(stage)
    return plan


def fit_stages(recipe: Recipe, config, edited, device: torch.device, parallel: Parallelism, gpu_bytes: float | None = None) -> MemoryPlan:
    """The stages as ``convert`` runs them on ``device`` (the GPU's total memory unless ``gpu_bytes`` says
    otherwise); a one-line AttnEditError when a stage fits at no micro-batch."""
    gpu = gpu_bytes if gpu_bytes is not None else device_memory(device)
    plan = plan_memory(recipe, config, edited, device, parallel, gpu)
    if not plan.fits:
        raise AttnEditError(refusal(recipe, config, edited, plan))
    return plan


def refusal(recipe: Recipe, config, edited, plan: MemoryPlan) -> str:
    """One line: which stage fits at no micro-batch, what it needs at its smallest, and what would fit."""
    number = next(n for n, row in plan.rows.items() if row is None)
    asked, load = plan.asked[number], plan.loads[number]
    checkpointing = None if load.gradient_checkpointing is None else True
    smallest = stage_bytes(plan.sizes, load, plan.layout, plan.wbytes, plan.layout.world, checkpointing)  # every layer recomputed
    need = smallest["total"] / GiB
    world = smallest_world(config, recipe, plan.gpu_bytes, adapt=True)[0]
    where = f"{world} such GPUs (torchrun --nproc_per_node {world})" if world else f"no count up to {WORLD_SIZES[-1]} such GPUs"
    least = "1 sequence per GPU" + (" with gradient checkpointing" if checkpointing else "")
    return (
        f"stage {number} does not fit this GPU ({plan.gpu_bytes / GiB:.1f} GiB) at any micro-batch: at the recipe's "
        f"{asked['batch_size']} x {asked['seq_len']} it needs {asked['total'] / GiB:.1f} GiB, and {need:.1f} GiB even at "
        f"{least}; what would fit: a GPU of {need:.0f} GiB or more, {where}, or a shorter stage{number}.seq_len"
    )


def smaller_fit(plan: MemoryPlan, number: int) -> tuple[dict, float] | None:
    """What stage ``number`` would run at on a GPU just smaller than its plan: the first setting after the one it
    runs at, in :func:`~attnedit.distributed.memory.fit`'s order, that needs less than every setting before it, and
    the GPU size (GiB, rounded up to 0.1 where that still picks it) at which ``fit`` chooses it. None when no
    setting needs less."""
    row, load = plan.rows.get(number), plan.loads.get(number)
    if row is None or load is None:
        return None
    order = fit_order(load, plan.layout.world)
    current = order.index((row["batch_size"], row["recomputed_layers"]))
    rows = [stage_bytes(plan.sizes, load, plan.layout, plan.wbytes, b, gc) for b, gc in order]
    least = min(r["total"] for r in rows[: current + 1])
    for candidate in rows[current + 1 :]:
        if candidate["total"] < least:
            for digits in (1, 2, 3):
                gib = math.ceil(candidate["total"] / GiB * 10**digits) / 10**digits
                if gib * GiB < least:
                    return candidate, gib
        least = min(least, candidate["total"])
    return None


def out_of_memory_text(plan: MemoryPlan, number: int, error: BaseException, resume: str) -> str:
    """One line when stage ``number`` ran out of GPU memory although the plan fitted it: where, what the plan
    expected, and the ``--gpu-memory`` that makes ``convert`` fit the next smaller setting (``resume``: the
    command to continue with, or to start again with)."""
    row = plan.rows[number]
    first = first_line(error, 120)
    where = (
        f"stage {number} ran out of GPU memory at micro-batch {row['batch_size']} x {row['seq_len']}"
        + (f" with {checkpointing_text(row)}" if row["gradient_checkpointing"] else "")
        + f" ({first}), where the plan expected {row['total'] / GiB:.1f} GiB of this GPU's {plan.gpu_bytes / GiB:.1f} GiB"
    )
    found = smaller_fit(plan, number)
    if found is None:
        return f"{where}; no smaller setting needs less: a GPU with more memory, more GPUs, or a shorter stage{number}.seq_len"
    smaller, gib = found
    how = f"micro-batch {smaller['batch_size']}, grad_accum {smaller['grad_accum']}" + (
        f", {checkpointing_text(smaller)}" if smaller["gradient_checkpointing"] else ""
    )
    return f"{where}; {resume} --gpu-memory {gib:g} runs it at {how} (the same global batch; plan {smaller['total'] / GiB:.2f} GiB)"


def memory_plan(config, recipe: Recipe, world: int, gpu_bytes: float | None) -> dict:
    """The per-GPU memory of the recipe on ``world`` GPUs under torchrun (FSDP2), each frozen-weight layout
    at the recipe's micro-batches, and the micro-batches fitted to ``gpu_bytes`` (``--world-size``)."""
    from ..surgery import edited_config

    edited = edited_config(config, recipe.target, recipe.target_args)
    plan = plan_memory(recipe, config, edited, torch.device("cuda"), FSDP2(world), gpu_bytes)
    options = {}
    for mode, rows in plan.options.items():
        peak = max((r["total"] for r in rows.values()), default=0)
        options[mode] = {"stages": list(rows.values()), "peak": peak, "fits": gpu_bytes is None or peak <= gpu_bytes}
    fitted = {n: row for n, row in plan.rows.items() if row is None or plan.adapted(n)}
    return {
        "world_size": world,
        "gpu_bytes": gpu_bytes,
        "options": options,
        "frozen": plan.layout.frozen,
        "fits": any(o["fits"] for o in options.values()),
        "fitted": fitted,
    }


def smallest_world(config, recipe: Recipe, gpu_bytes: float, adapt: bool = False) -> tuple[int | None, str | None]:
    """The fewest GPUs of ``gpu_bytes`` each on which every stage fits (at the recipe's micro-batches, or
    with ``adapt`` at any), and the frozen-weight layout then."""
    for n in WORLD_SIZES:
        plan = memory_plan(config, recipe, n, gpu_bytes)
        if plan["fits"] or (adapt and all(row is not None for row in plan["fitted"].values())):
            return n, plan["frozen"]
    return None, None


# ------------------------------------------------------------------------------------ the dry run


def make_plan(recipe: Recipe, gpu_memory: float | None = None, world: int | None = None) -> dict:
    """The ``--dry-run`` plan of ``recipe`` (a dict; :func:`attnedit.stages.format.format_plan` prints it).

    On the recipe's device; with ``gpu_memory`` (GiB) or ``world`` (processes under torchrun), on that many
    GPUs of that size (80 GiB unless said), which ``convert`` there would fit its stages to.
    """
    from ..data import check_files
    from ..eval.inspect import layout_notes, rope_notes
    from ..eval.kv import kv_summary, usable_context
    from ..surgery import edited_config
    from ..teachers import load_config
    from .evaluate import describe

    config = load_config(recipe.teacher)
    check_seq_len(recipe, config)
    edited = edited_config(config, recipe.target, recipe.target_args)
    files = check_files(recipe.data)
    on_gpu = gpu_memory is not None or world is not None
    device = torch.device("cuda") if on_gpu else resolve_device(recipe.device)
    parallel = FSDP2(world) if world else Parallelism()
    gpu = (gpu_memory or DEFAULT_GPU_GIB) * GiB if on_gpu else device_memory(device)
    memory = plan_memory(recipe, config, edited, device, parallel, gpu)
    wdtype = weights_dtype(recipe, device)
    layers = edited.edit["edited_layers"]
    context = usable_context(config, max(recipe.data.seq_len, KV_CONTEXT))
    kv_dtype = str(wdtype).replace("torch.", "")  # the dtype convert saves the model in, so its cache's
    kv_t, kv_s = kv_summary(config, context, kv_dtype), kv_summary(edited, context, kv_dtype)
    rows = []
    for stage in memory.stages:
        cfg, seq = stage.cfg, stage.seq_len
        row = memory.rows.get(stage.number)
        rows.append(
            {
                "stage": stage.number,
                "steps": cfg.steps,
                "batch": f"{cfg.batch_size} x {cfg.grad_accum} x {seq}",
                "tokens": cfg.steps * cfg.batch_size * cfg.grad_accum * seq,
                "lr": f"{cfg.lr:g} ({cfg.schedule}, warmup {cfg.warmup}, min {cfg.min_lr:g})",
                "trainable_params": memory.loads[stage.number].trained if stage.runs else 0,
                "precision": "bf16" if use_bf16(device, cfg.precision) else "fp32",
                "memory_bytes": int(row["peak"]) if row else (int(memory.asked[stage.number]["peak"]) if stage.runs else 0),
                "memory": fit_note(stage, memory) if stage.runs else None,
            }
        )
    return {
        "teacher": recipe.teacher,
        "family": config.model_type,
        "teacher_params": memory.sizes.teacher,
        "num_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "target": recipe.target,
        "target_args": recipe.target_args,
        "edited_layers": layers,
        "new_params": memory.sizes.new_attention,
        "replaced_params": sum(x["params"] for x in kv_t["layers"] if x["layer"] in layers),
        "kv_context": context,
        "kv_dtype": kv_dtype,
        "kv_bytes_per_token": {"teacher": kv_t["kv_bytes_per_token"], "edited": kv_s["kv_bytes_per_token"]},
        "data_files": [str(f) for f in files],
        "seq_len": recipe.data.seq_len,
        "recall_fraction": (
            recipe.stage2.recall_fraction if recipe.stage2.steps and spans_fit(stages(recipe)[1].seq_len, recipe.stage2.recall_min_distance) else 0.0
        ),
        "recall_min_distance": recipe.stage2.recall_min_distance,
        "device": str(device),
        "parallel": parallel.describe() + (f", frozen weights {'sharded' if memory.layout.shard_frozen else 'replicated'}" if world else ""),
        "gpu_bytes": gpu,
        "weights_dtype": str(wdtype).replace("torch.", ""),
        "stages": rows,
        "checkpoint_every": recipe.checkpoint_every,
        "eval": describe(recipe.eval),
        "notes": layout_notes(edited) + rope_notes(edited, context),
    }


def fit_note(stage: Stage, memory: MemoryPlan) -> dict:
    """How the stage meets the GPU: the recipe's micro-batch and its total, and the one it runs at."""
    asked, row = memory.asked[stage.number], memory.rows[stage.number]
    note = {"gpu_bytes": memory.gpu_bytes, "asked_batch_size": asked["batch_size"], "asked_total": int(asked["total"])}
    if row is None:
        note["fits"] = False
        return note
    note.update(fits=True, total=int(row["total"]), adapted=memory.adapted(stage.number), batch_size=row["batch_size"],
                grad_accum=row["grad_accum"], gradient_checkpointing=row["gradient_checkpointing"],
                recomputed_layers=row["recomputed_layers"], layers=row["layers"])  # fmt: skip
    return note


def fit_summary(stage: Stage, memory: MemoryPlan) -> dict | None:
    """``summary.json``'s record of a stage run at another micro-batch than the recipe's (None: as the recipe says)."""
    note = fit_note(stage, memory)
    if not note.get("adapted"):
        return None
    cfg = stage.asked
    out = {
        "batch_size": stage.cfg.batch_size,
        "grad_accum": stage.cfg.grad_accum,
        "recipe_batch_size": cfg.batch_size,
        "recipe_grad_accum": cfg.grad_accum,
        "planned_bytes_at_recipe_batch": note["asked_total"],
        "planned_bytes": note["total"],
        "gpu_bytes": int(memory.gpu_bytes),
    }
    if stage.gradient_checkpointing is not None:
        out["gradient_checkpointing"] = stage.cfg.gradient_checkpointing
        if stage.recomputed_layers is not None:
            out["recomputed_layers"] = stage.recomputed_layers
    return out


def estimated_memory(recipe: Recipe, stage: int) -> int:
    """The ``--dry-run`` memory estimate of ``stage`` (bytes), for ``summary.json``."""
    return next(s["memory_bytes"] for s in make_plan(recipe)["stages"] if s["stage"] == stage)
