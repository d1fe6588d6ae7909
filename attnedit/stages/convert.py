"""``attnedit convert``: one recipe, one run folder: edit -> stage 1 -> stage 2 -> held-out eval -> saved model
-> the recipe's ``eval:`` section.

The run folder holds ``recipe.yaml`` (fully resolved), ``metrics.jsonl``, ``checkpoints/``,
``summary.json`` and, at the end, ``model/`` (an ordinary Hugging Face checkpoint with remote code and
``attnedit.json``). Every stage checkpoints as it goes, so ``convert RUN --resume`` continues any
interrupted run and reaches the same weights as an uninterrupted one. Then, when the recipe's ``eval:``
section asks for them, ``eval.json``, ``passkey.json``, ``bench.json`` and ``report.md`` (``evaluate.py``);
``eval``, ``bench`` and ``report`` can also be run on the folder by hand; ``export`` converts its model.

Planning (``--dry-run``, the memory estimate) lives in ``plan.py``, printing in ``format.py``, the run
folder's recipe checks in ``rundir.py``, the training loop in ``trainer.py`` and the evaluation after saving
in ``evaluate.py``; this file is the order.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from functools import partial
from pathlib import Path

import torch

from .. import distributed
from ..devices import autocast, resolve_device
from ..distributed import checkpoint as dcp_checkpoint
from ..errors import AttnEditError
from ..io import remove_temp_files, write_error_text, write_errors, write_json, write_text
from ..recipe import Recipe
from . import stage1, stage2
from .checkpoint import list_checkpoints, load_latest
from .evaluate import evaluate_run, missing_parts
from .plan import check_seq_len, estimated_memory, stage_config, stage_data, stage_seq_len, validate_start, weights_dtype
from .rundir import check_new_run_dir, prepare_run_dir
from .speed import CompileGroup, compile_wanted, peak_memory, reset_peak_memory, teacher_forward_tok_s, warm_up
from .trainer import Run, StageJob, load_weights, profile_stage, train_stage


def convert(recipe: Recipe, run_dir: str | os.PathLike, resume: bool = False, progress: str = "auto") -> dict:
    """Run a recipe into ``run_dir`` (or continue it with ``resume``), then its ``eval:`` section; return the
    summary. A resumed run whose model is saved trains nothing and only evaluates what is missing."""
    run_dir = Path(run_dir)
    if resume and (run_dir / "summary.json").is_file() and (run_dir / "model").is_dir():
        prepare_run_dir(recipe, run_dir, resume)
        missing = missing_parts(recipe, run_dir)
        todo = f"; evaluating what is missing: {', '.join(missing)}" if missing else ""
        print(f"attnedit: {run_dir} has already finished; its model is in {run_dir / 'model'}{todo}", file=sys.stderr)
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        summary = train_and_save(recipe, run_dir, resume, progress)
    if recipe.eval.parts() and distributed.is_main():  # the training models are freed by now
        evaluate_run(recipe, run_dir, quiet=progress == "none")
    return summary


def train_and_save(recipe: Recipe, run_dir: Path, resume: bool, progress: str) -> dict:
    """Edit -> stage 1 -> stage 2 -> held-out eval -> ``model/`` and ``summary.json``; returns the summary."""
    if resume:
        prepare_run_dir(recipe, run_dir, resume)
    else:  # a failed start must not leave a folder that refuses both a new start and --resume
        check_new_run_dir(run_dir)
        validate_start(recipe)
    distributed.barrier()  # every rank has checked the folder before rank 0 creates it
    if not distributed.is_main():
        progress = "none"
    device = resolve_device(recipe.device)
    chosen = run_dir / FULL_LAYERS
    measured = json.loads(chosen.read_text()) if resume and chosen.is_file() else None
    teacher, student, tokenizer, measured = edit(recipe, device, measured)  # stage 0
    existed = run_dir.exists()
    if not resume and distributed.is_main():  # rank 0 alone writes the run folder
        prepare_run_dir(recipe, run_dir, resume)
        if measured is not None:  # full_layers=auto:K: the measured choice, reused on resume
            write_text(chosen, json.dumps(measured, indent=2) + "\n")
    distributed.barrier()
    try:
        return _run(recipe, run_dir, resume, progress, teacher, student, tokenizer, device)
    except Exception as e:
        # a new run that fails before its first checkpoint leaves nothing behind: the same --out starts
        # again once the input is fixed (a failed checkpoint write says to resume: that folder stays)
        saved = list_checkpoints(run_dir) or dcp_checkpoint.list_checkpoints(run_dir)
        if not resume and not saved and not getattr(e, "resumable", False) and distributed.is_main():
            for p in list(run_dir.iterdir()) if existed else [run_dir]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise


def _run(recipe: Recipe, run_dir: Path, resume: bool, progress: str, teacher, student, tokenizer, device) -> dict:
    """Train the stages (from the last good checkpoint when resuming), evaluate, save the model."""
    if not resume:
        state = None
    elif distributed.is_distributed():  # sharded (DCP) checkpoints, trained weights read whole
        state = dcp_checkpoint.load_latest(run_dir, owned=owned_parameters(student, teacher))
    else:
        state = load_latest(run_dir)
    layers = student.config.edit["edited_layers"]
    summary = state["summary"] if state else {"teacher": recipe.teacher, "target": recipe.target, "edited_layers": layers}
    full = [i for i, x in enumerate(student.config.layer_attention) if x.get("layer_type") == "full"]
    if full and "full_layers" not in summary:
        summary["full_layers"] = full
    run = Run(run_dir, recipe, device, summary, progress)
    restore(run, state, resume, teacher, student)
    heldout = heldout_eval(recipe, teacher, student, tokenizer, device)
    if heldout is not None and "heldout_before" not in run.summary:
        run.summary["heldout_before"] = heldout()
    baselines = teacher_baselines(recipe, teacher, device, state, quiet=run.progress == "none")
    with run.stop_on_signals():
        for stage in (1, 2):  # stage 1: layer-wise teacher forcing; stage 2: model-level KD
            if stage_config(recipe, stage).steps and not _finished(state, stage):
                train(stage, run, recipe, teacher, student, tokenizer, device, baselines.get(stage), state)
                state = None  # a resumed stage has used its checkpoint; the next one starts fresh
    freeze(student)
    if heldout is not None:
        run.summary["heldout_after"] = heldout()
    if distributed.is_distributed():  # whole weights on rank 0, which alone writes the model
        from ..distributed.fsdp import gather_full

        gather_full(student, keep=distributed.is_main())
        if not distributed.is_main():
            return run.summary
    save_model(run, recipe, student, teacher.config, tokenizer, weights_dtype(recipe, device))
    return run.summary


# ------------------------------------------------------------------------------------ the steps


FULL_LAYERS = "full_layers.json"  # GateSWA full_layers=auto:K: the layers chosen and each layer's measured cost


def edit(recipe: Recipe, device: torch.device, measured: dict | None = None):
    """Stage 0: load the teacher (frozen) and replace its attention; the new attention trains in fp32.

    With GateSWA ``full_layers: auto:K`` the K full layers are measured first on the run's own data
    (``measured``, from an earlier start of the run, is reused as it is). Returns the teacher, the student,
    the tokenizer and that measurement (None without ``auto:K``).
    """
    from ..data import resolve_tokenizer
    from ..surgery import edit_model
    from ..surgery.sensitivity import resolve_auto_full_layers
    from ..teachers import load_model

    teacher, teacher_tok = load_model(recipe.teacher, dtype=weights_dtype(recipe, device), device=device)
    check_seq_len(recipe, teacher.config)
    tokenizer = resolve_tokenizer(recipe.data, teacher_tok, teacher.config.vocab_size)
    teacher.requires_grad_(False)
    calib = None
    if recipe.target == "mla" and recipe.target_args.get("init") == "teacher":
        calib = calibration_ids(recipe, tokenizer, teacher.config.hidden_size)
    target_args = recipe.target_args
    if recipe.target == "gateswa":
        calibration = lambda: sensitivity_ids(recipe, tokenizer)  # noqa: E731
        if measured is None and distributed.is_main():  # rank 0 measures; every rank builds its choice
            _, measured = resolve_auto_full_layers(teacher, target_args, calibration)
        measured = distributed.broadcast_object(measured)
        target_args, measured = resolve_auto_full_layers(teacher, target_args, calibration, measured)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    student = edit_model(teacher, recipe.target, target_args, calibration_ids=calib)
    for i in student.config.edit["edited_layers"]:
        student.attentions()[i].float()  # trained weights stay fp32 (AdamW master copies); autocast does the rest
    return teacher, student, tokenizer, measured


def training_blocks(recipe: Recipe, tokenizer, seq: int, n: int) -> torch.Tensor:
    """The first ``n`` blocks of ``seq`` tokens of the run's own training data (never the held-out documents)."""
    from ..data import BlockStream

    return BlockStream(stage_data(recipe, seq), tokenizer, seed=recipe.seed, prefetch=False).next_batch(n)


def sensitivity_ids(recipe: Recipe, tokenizer, n: int = 8) -> torch.Tensor:
    """Blocks at the run's longest sequence length, for choosing full layers (``full_layers: auto:K``)."""
    return training_blocks(recipe, tokenizer, max(stage_seq_len(recipe, 1), stage_seq_len(recipe, 2)), n)


def calibration_ids(recipe: Recipe, tokenizer, hidden_size: int) -> torch.Tensor:
    """Blocks for the teacher initialisation of MLA, instead of random token ids: about twice the hidden
    size in tokens."""
    seq = min(recipe.data.seq_len, 256)
    return training_blocks(recipe, tokenizer, seq, max(4, min(16, -(-2 * hidden_size // seq))))


def owned_parameters(student, teacher) -> list[tuple[str, torch.nn.Parameter]]:
    """The student's weights that are not the teacher's: what training changes and checkpoints hold."""
    teacher_ids = {id(p) for p in teacher.parameters()}
    return [(n, p) for n, p in student.named_parameters() if id(p) not in teacher_ids]


def restore(run: Run, state: dict | None, resume: bool, teacher, student) -> None:
    """Put the last good checkpoint's weights and log position back (resume only)."""
    if state is not None:
        if state["stage"] == 2:
            stage2.unshare(student, teacher, run.recipe.stage2.trainable)
        load_weights(owned_parameters(student, teacher), state)
        run.metrics.truncate(state["metrics_offset"])
    elif resume:
        run.metrics.truncate(0)  # no checkpoint was ever written: the run starts over, its lines too


def heldout_eval(recipe: Recipe, teacher, student, tokenizer, device):
    """A function giving the held-out KL and CEs of the student now, or None when there is none."""
    from ..data import heldout_blocks

    blocks = heldout_blocks(recipe.data, tokenizer) if recipe.heldout_eval else None
    if blocks is None or not len(blocks):
        return None
    cfg = recipe.stage2
    return lambda: stage2.heldout_losses(teacher, student, blocks, cfg.batch_size, cfg.kl_chunk, lambda: autocast(device, cfg.precision))


def teacher_baselines(recipe: Recipe, teacher, device: torch.device, state: dict | None, quiet: bool) -> dict[int, float]:
    """Tokens/s of the teacher's plain forward at the batch shape of each stage still to run (this session's hardware)."""
    out: dict[int, float] = {}
    if recipe.baseline_batches == 0:
        return out
    for stage in (1, 2):
        cfg, seq = stage_config(recipe, stage), stage_seq_len(recipe, stage)
        if cfg.steps == 0 or _finished(state, stage):
            continue
        out[stage] = teacher_forward_tok_s(
            teacher, cfg.batch_size, seq, device, lambda cfg=cfg: autocast(device, cfg.precision), recipe.baseline_batches
        )
        if not quiet:
            print(f"attnedit: teacher plain forward at stage {stage}'s batch ({cfg.batch_size} x {seq}): {out[stage]:,.0f} tok/s", file=sys.stderr)
    return out


def _finished(state: dict | None, stage: int) -> bool:
    return state is not None and (state["stage"] > stage or (state["stage"] == stage and state["done"]))


def stage_job(stage: int, recipe: Recipe, teacher, student, tokenizer, device, group: CompileGroup | None = None) -> StageJob:
    """A stage's trainable parameters, loss and data stream; everything else frozen."""
    from ..data import BlockStream, DeviceBatches
    from ..data.recall import with_recall_spans

    cfg, seq = stage_config(recipe, stage), stage_seq_len(recipe, stage)
    # each stage reads its own shuffle of the data (seed + stage - 1), at its own sequence length; batches
    # reach the device one ahead of training (pinned, non-blocking on CUDA); resume stays exact
    recall = getattr(cfg, "recall_fraction", 0.0)  # stage 2's long-range retrieval mix (attnedit.data.recall)
    transform = partial(with_recall_spans, fraction=recall, seed=recipe.seed) if recall else None
    stream = DeviceBatches(BlockStream(stage_data(recipe, seq), tokenizer, seed=recipe.seed + stage - 1), device, transform=transform)
    if stage == 1:
        params, loss_fn = stage1.trainable(student), stage1.make_loss(teacher, student, group)
    else:
        params, loss_fn = stage2.trainable(student, cfg.trainable), stage2.make_loss(teacher, student, cfg, group)
        student.gradient_checkpointing = cfg.gradient_checkpointing
        # the layer loop checkpoints only in training mode; set the flag on the top module alone, so the
        # shared teacher modules stay in eval mode (no dropout or router noise in the teacher)
        student.training = cfg.gradient_checkpointing
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    return StageJob(stage, cfg, params, loss_fn, stream, seq)


def train(stage: int, run: Run, recipe: Recipe, teacher, student, tokenizer, device, baseline: float | None, state: dict | None) -> None:
    """One stage from its start (or from ``state``'s checkpoint); its figures go into the run's summary."""
    cfg = stage_config(recipe, stage)
    if stage == 2:
        stage2.unshare(student, teacher, cfg.trainable)
    run.owned = owned_parameters(student, teacher)
    what = "the stage-1 attentions and the teacher's capture" if stage == 1 else "the stage-2 decoder layers (student and teacher)"
    group = CompileGroup(compile_wanted(cfg.compile, device), what)
    job = stage_job(stage, recipe, teacher, student, tokenizer, device, group)
    if distributed.is_distributed():  # the FSDP2 plan, and this rank's share of every batch
        from ..distributed.data_parallel import distribute

        job.model = student
        distribute(job, teacher, student, run)
    job.teacher_fwd_tok_s = baseline
    job.teacher_forward = lambda ids: plain_forward(teacher, ids, group)
    undos: list = []
    undo = lambda: [u() for u in reversed(undos)]  # noqa: E731
    try:
        if stage == 1:
            undos.append(stage1.compile_teacher_modules(teacher, list(student.config.edit["edited_layers"]), group))
        if stage == 2:
            undos.append(stage2.compile_layers(student, group))
            if not distributed.is_distributed():  # FSDP2 wraps the teacher's layers itself: left eager there
                undos.append(stage2.compile_teacher_layers(teacher, group))
        resume_state = state if state is not None and state["stage"] == stage else None
        if resume_state is None:
            job.stream.check()  # too little data fails here, before the stage's first checkpoint
        if group.enabled:  # compile (forward and backward) now, not inside the first timed steps
            warm_up(job.loss_fn, [p for _, p in job.params], cfg.batch_size, job.seq_len,
                    teacher.config.vocab_size, device, lambda: autocast(device, cfg.precision), group)  # fmt: skip
        if resume_state is None:
            run.summary[f"stage{stage}"] = {"steps": cfg.steps, "tokens": cfg.steps * job.tokens_per_step, "wall_start": run.wall()}
        reset_peak_memory(device)
        opt = train_stage(run, job, resume_state)
        info = run.summary[f"stage{stage}"]
        info["peak_memory_bytes"] = peak_memory(device)
        info["est_memory_bytes"] = int(estimated_memory(recipe, stage))
        info["compiled"] = group.enabled
        if recipe.profile_steps and not distributed.is_distributed():
            try:  # a measurement: if it fails (memory, the profiler), the trained stage stands and the run goes on
                profile = profile_stage(run, job, opt)
            except Exception as e:  # noqa: BLE001
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                print(f"attnedit: warning: profiling stage {stage} failed ({type(e).__name__}: {first}); no profile-stage{stage}.json", file=sys.stderr)
            else:
                write_json(run.dir / f"profile-stage{stage}.json", profile)
                info["profile"] = profile_summary(profile)
    finally:
        undo()
        job.stream.close()


def plain_forward(teacher, ids, group: CompileGroup):
    """The teacher's plain forward, eager even while the stage runs its modules compiled (the group steps
    aside), so that the profile's teacher is the baseline's: what the tok/s ratios compare against."""
    enabled, group.enabled = group.enabled, False
    try:
        return teacher(input_ids=ids, use_cache=False)
    finally:
        group.enabled = enabled


def profile_summary(profile: dict) -> dict:
    """The profile's headline figures for ``summary.json`` (the whole profile is ``profile-stage<N>.json``)."""
    by_kind = lambda p: {k: v["ms_per_step"] for k, v in p["by_kind"].items()}  # noqa: E731
    out = {"student_step_device_ms": profile["student_step"]["device_ms_per_step"], "student_by_kind_ms": by_kind(profile["student_step"])}
    if "teacher_forward" in profile:
        out["teacher_forward_ms_same_tokens"] = profile["teacher_forward_ms_same_tokens"]
        accum = profile["grad_accum"]  # a step's batches: the teacher's forward over the same tokens
        out["teacher_by_kind_ms"] = {k: round(v * accum, 4) for k, v in by_kind(profile["teacher_forward"]).items()}
        out["device_ratio"] = profile["device_ratio"]
    return out


def freeze(student) -> None:
    student.eval()
    student.gradient_checkpointing = False
    for p in student.parameters():
        p.requires_grad_(False)


def save_model(run: Run, recipe: Recipe, student, teacher_config, tokenizer, wdtype: torch.dtype) -> None:
    """``model/`` (with ``attnedit.json``) and ``summary.json`` (with the KV figures ``report`` reads)."""
    from ..eval.kv import kv_figures
    from ..export import save_edited

    run_dir = run.dir
    student.to(wdtype)
    try:
        save_edited(student, run_dir / "model", tokenizer, overwrite=True, recipe=recipe)
    except write_errors() as e:  # a full disk, as OSError or torch's/safetensors' own error
        remove_temp_files(run_dir)
        raise AttnEditError(
            f"could not write the model to {run_dir / 'model'}: {write_error_text(e)}; the trained weights are in the "
            f"last checkpoint; free disk space, then run: attnedit convert {run_dir} --resume"
        ) from None
    for stage in (1, 2):
        run.summary.get(f"stage{stage}", {}).pop("wall_start", None)
    run.summary["wall_s"] = round(run.wall(), 1)
    run.summary["model"] = str(run_dir / "model")
    run.summary["kv"] = kv_figures(student.config, teacher_config, "bfloat16")
    write_text(run_dir / "summary.json", json.dumps(run.summary, indent=2) + "\n")
