"""``attnedit convert``: one recipe, one run folder: edit -> stage 1 -> stage 2 -> held-out eval -> saved model
-> the recipe's ``eval:`` section.

The run folder holds ``recipe.yaml`` (fully resolved), ``metrics.jsonl``, ``checkpoints/``,
``summary.json`` and, at the end, ``model/`` (an ordinary Hugging Face checkpoint with remote code and
``attnedit.json``). Every stage checkpoints as it goes, so ``convert RUN --resume`` continues any
interrupted run and reaches the same weights as an uninterrupted one. Then, when the recipe's ``eval:``
section asks for them, ``eval.json``, ``passkey.json``, ``bench.json`` and ``report.md`` (``evaluate.py``);
``eval``, ``bench`` and ``report`` can also be run on the folder by hand; ``export`` converts its model.

The conversion context and stage 0 live in ``context.py``, the stages in ``stage1.py`` and ``stage2.py``
(``base.Stage``), planning (``--dry-run``, the memory model's fit to the GPU) in ``plan.py``, printing in
``format.py``, the run folder's recipe checks in ``rundir.py``, the training loop in ``trainer.py``, the
evaluation after saving in ``evaluate.py``, and what differs on N processes in the strategy
(``attnedit.distributed``); this file is the order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from .. import distributed
from ..devices import autocast, resolve_device
from ..distributed import Parallelism
from ..distributed.strategy import load_weights
from ..errors import AttnEditError, is_out_of_memory
from ..io import WriteFailed, remove_temp_files, write_error_text, write_errors, write_json, write_text
from ..recipe import Recipe
from ..results import RESULT_FILES as RESULTS
from ..results import Summary
from ..targets.common import first_line
from .base import Conversion, Stage
from .context import FULL_LAYERS, edit
from .evaluate import evaluate_run, missing_parts
from .format import fit_text, stage_done_text
from .plan import MemoryPlan, fit_note, fit_stages, fit_summary, out_of_memory_text, validate_start, weights_dtype
from .rundir import check_new_run_dir, prepare_run_dir
from .speed import CompileGroup, compile_wanted, peak_memory, reset_peak_memory, teacher_forward_tok_s, warm_up
from .stage2 import heldout_losses
from .trainer import Run, profile_stage, train_stage


def convert(recipe: Recipe, run_dir: str | os.PathLike, resume: bool = False, progress: str = "auto", parallel: Parallelism | None = None) -> dict:
    """Run a recipe into ``run_dir`` (or continue it with ``resume``), then its ``eval:`` section; return the
    summary. A resumed run whose model is saved trains nothing and only evaluates what is missing.
    ``parallel``: the strategy (default: this process's, :func:`attnedit.distributed.current`)."""
    run_dir = Path(run_dir)
    parallel = parallel or distributed.current()
    if resume and Summary.path(run_dir).is_file() and (run_dir / "model").is_dir():
        prepare_run_dir(recipe, run_dir, resume)
        missing = missing_parts(recipe, run_dir)
        todo = f"; evaluating what is missing: {', '.join(missing)}" if missing else ""
        print(f"attnedit: {run_dir} has already finished; its model is in {run_dir / 'model'}{todo}", file=sys.stderr)
        summary = Summary.read(run_dir).to_dict()
    else:
        summary = train_and_save(recipe, run_dir, resume, progress, parallel)
    if recipe.eval.parts() and parallel.main:  # the training models are freed by now
        evaluate_run(recipe, run_dir, quiet=progress == "none")
    return summary


def train_and_save(recipe: Recipe, run_dir: Path, resume: bool, progress: str, parallel: Parallelism) -> dict:
    """Edit -> stage 1 -> stage 2 -> held-out eval -> ``model/`` and ``summary.json``; returns the summary."""
    if resume:
        prepare_run_dir(recipe, run_dir, resume)
    else:  # a failed start must not leave a folder that refuses both a new start and --resume
        check_new_run_dir(run_dir)
        validate_start(recipe, parallel)
    parallel.barrier()  # every process has checked the folder before the main one creates it
    if not parallel.main:
        progress = "none"
    chosen = run_dir / FULL_LAYERS
    measured = json.loads(chosen.read_text()) if resume and chosen.is_file() else None
    ctx, measured = edit(recipe, resolve_device(recipe.device), run_dir, parallel, measured)  # stage 0
    existed = run_dir.exists()
    if not resume and parallel.main:  # the main process alone writes the run folder
        prepare_run_dir(recipe, run_dir, resume)
        if measured is not None:  # an auto choice of full layers or heads: the measured choice, reused on resume
            write_text(chosen, json.dumps(measured, indent=2) + "\n")
    parallel.barrier()
    try:
        return _run(recipe, ctx, resume, progress)
    except Exception as e:
        # a new run that fails before its first checkpoint leaves nothing behind: the same --out starts
        # again once the input is fixed (a failed checkpoint write says to resume: that folder stays)
        saved = parallel.list_checkpoints(run_dir)
        if not resume and not saved and not getattr(e, "resumable", False) and parallel.main:
            for p in list(run_dir.iterdir()) if existed else [run_dir]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        elif saved and parallel.main and not isinstance(e, AttnEditError):  # a failure of the code or the machine
            print(f"attnedit: {kept_work_text(run_dir, saved[-1], e)}", file=sys.stderr)
        raise


def _run(recipe: Recipe, ctx: Conversion, resume: bool, progress: str) -> dict:
    """Train the stages (from the last good checkpoint when resuming), evaluate, save the model."""
    student, parallel = ctx.student, ctx.parallel
    memory = fit_stages(recipe, ctx.teacher.config, student.config, ctx.device, parallel)  # the stages as they run here
    state = parallel.load_latest(ctx.run_dir, owned=ctx.owned()) if resume else None
    if resume and parallel.main:
        announce_resume(ctx.run_dir, memory.stages, state)
    summary = state["summary"] if state else {"teacher": recipe.teacher, "target": recipe.target, "edited_layers": ctx.edited_layers}
    full = [i for i, x in enumerate(student.config.layer_attention) if x.get("layer_type") == "full"]
    if full and "full_layers" not in summary:
        summary["full_layers"] = full
    heads = [[i, h] for i, x in enumerate(student.config.layer_attention) for h in x.get("full_kv_heads") or []]
    if heads and "full_heads" not in summary:
        summary["full_heads"] = heads
    run = Run(ctx, recipe, summary, progress)
    restore(ctx, run, memory.stages, state, resume)
    heldout = heldout_eval(recipe, ctx, memory.stages)
    if heldout is not None and "heldout_before" not in run.summary:
        run.summary.update(heldout("before"))
    todo = [stage for stage in memory.stages if stage.runs and not stage.finished(state)]
    baselines = teacher_baselines(ctx, todo, recipe.baseline_batches, quiet=run.progress == "none")
    with run.stop_on_signals():
        for stage in todo:  # stage 1: layer-wise teacher forcing; stage 2: model-level KD
            resume_state = state if state is not None and state["stage"] == stage.number else None
            try:
                train(ctx, run, stage, memory, baselines.get(stage.number), resume_state)
            except Exception as e:
                if is_out_of_memory(e) and memory.gpu_bytes:  # the plan fitted it to a GPU and fell short
                    raise AttnEditError(out_of_memory_text(memory, stage.number, e, continue_command(ctx))) from e
                raise
    freeze(student)
    if heldout is not None:
        run.summary.update(heldout("after"))
    if not parallel.gather(student):  # whole weights in the process that saves the model
        return run.summary
    save_model(run, ctx, weights_dtype(recipe, ctx.device))
    return run.summary


# ------------------------------------------------------------------------------------ the steps


RESULT_FILES = (*(r.FILE for r in RESULTS), "report.md")  # made from the saved model
EARLIER = "earlier-model"  # where a resumed run that trains again puts the results of the model it replaces


def continue_command(ctx: Conversion) -> str:
    """How to go on after a failure that the same command with other flags would avoid: from the newest checkpoint
    when there is one (the run folder is kept), else from the start (a new run's folder is removed)."""
    saved = ctx.parallel.list_checkpoints(ctx.run_dir)
    return kept_text(ctx.run_dir, saved[-1]) if saved else "the same command with"


def kept_text(run_dir: Path, newest: Path) -> str:
    """The training a stopped run keeps, and the command that continues it."""
    return f"its training up to checkpoint {newest.name} is kept: attnedit convert {run_dir} --resume"


def kept_work_text(run_dir: Path, newest: Path, error: BaseException) -> str:
    """One line after an unexpected failure (its traceback above it): the training that is kept and how to go on."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"the run stopped ({type(error).__name__}{': ' + first if first else ''}); {kept_text(run_dir, newest)} continues from there"


def announce_resume(run_dir: Path, stages: list[Stage], state: dict | None) -> None:
    """Say what a resumed run rebuilds. The result files of a model it will not reproduce (it trains
    again) are moved to ``earlier-model/`` and made again once the new model is saved; a model rebuilt from
    the final checkpoint has the same weights, so its results stay."""
    final = state is not None and all(stage.finished(state) for stage in stages if stage.runs)
    results = [name for name in RESULT_FILES if (run_dir / name).is_file()]

    def say(line: str) -> None:
        print(f"attnedit: {line}", file=sys.stderr)

    if state is None:
        say(f"{run_dir} has no checkpoint to continue from ({run_dir / 'checkpoints'} is empty or missing): training from the start")
    elif final:
        kept = f"; {', '.join(results)} were made from these weights and are kept" if results else ""
        say(f"{run_dir / 'model'} is missing: rebuilding it from the final checkpoint (stage {state['stage']}, step {state['step']}){kept}")
    else:
        say(f"continuing {run_dir} from its checkpoint at stage {state['stage']}, step {state['step']}")
    if results and not final:
        earlier = run_dir / EARLIER
        earlier.mkdir(exist_ok=True)
        for name in results:
            os.replace(run_dir / name, earlier / name)
        say(f"{', '.join(results)} came from a model this run replaces: moved to {earlier}; they are made again once the model is saved")


def restore(ctx: Conversion, run: Run, stages: list[Stage], state: dict | None, resume: bool) -> None:
    """Put the last good checkpoint's weights and log position back (resume only)."""
    if state is not None:
        next(s for s in stages if s.number == state["stage"]).prepare(ctx.student, ctx.teacher)
        load_weights(ctx.owned(), state)
        run.metrics.truncate(state["metrics_offset"])
    elif resume:
        run.metrics.truncate(0)  # no checkpoint was ever written: the run starts over, its lines too


def heldout_eval(recipe: Recipe, ctx: Conversion, stages: list[Stage]):
    """A function of ``"before"``/``"after"`` giving the student's held-out KL and CEs now, as summary keys, or None
    when there are no held-out blocks: on blocks of ``data.seq_len`` tokens, and where a stage that runs trains on
    longer sequences, the same text in blocks of that length too (``heldout_<when>_long``)."""
    from ..data import heldout_blocks

    blocks = heldout_blocks(recipe.data, ctx.tokenizer) if recipe.heldout_eval else None
    if blocks is None or not len(blocks):
        return None
    views = {"": (blocks, recipe.stage2.batch_size)}
    longest = max((stage for stage in stages if stage.runs), key=lambda stage: stage.seq_len, default=None)
    n_long = blocks.numel() // longest.seq_len if longest is not None else 0  # within the short blocks' text: held out
    if n_long and longest.seq_len > recipe.data.seq_len:  # from every stage, whatever its length
        long_data = dataclasses.replace(recipe.data, seq_len=longest.seq_len, heldout_blocks=n_long)
        views["_long"] = (heldout_blocks(long_data, ctx.tokenizer), longest.cfg.batch_size)
    cfg, device = recipe.stage2, ctx.device

    def measure(when: str) -> dict:
        return {
            f"heldout_{when}{suffix}": heldout_losses(ctx.teacher, ctx.student, ids, batch, cfg.kl_chunk, lambda: autocast(device, cfg.precision))
            for suffix, (ids, batch) in views.items()
        }

    return measure


def teacher_baselines(ctx: Conversion, todo: list[Stage], batches: int, quiet: bool) -> dict[int, float]:
    """Tokens/s of the teacher's plain forward at the batch shape of each stage still to run (this machine's hardware),
    timed over ``batches`` batches (0: not measured)."""
    out: dict[int, float] = {}
    if batches == 0:
        return out
    for stage in todo:
        cfg, seq = stage.cfg, stage.seq_len
        out[stage.number] = teacher_forward_tok_s(ctx.teacher, cfg.batch_size, seq, ctx.device, lambda cfg=cfg: autocast(ctx.device, cfg.precision), batches)
        if not quiet:
            print(
                f"attnedit: teacher plain forward at stage {stage.number}'s batch ({cfg.batch_size} x {seq}): {out[stage.number]:,.0f} tok/s", file=sys.stderr
            )
    return out


def train(ctx: Conversion, run: Run, stage: Stage, memory: MemoryPlan, baseline: float | None, state: dict | None) -> None:
    """One stage from its start (or from ``state``'s checkpoint); its figures go into the run's summary."""
    cfg, device = stage.cfg, ctx.device
    stage.prepare(ctx.student, ctx.teacher)
    group = CompileGroup(compile_wanted(cfg.compile, device), stage.compiles)
    job = stage.job(ctx, group)
    ctx.parallel.shard(job, ctx.teacher, ctx.student, memory.layout, stage.trains, run.progress)
    run.owned = ctx.owned()
    job.teacher_fwd_tok_s = baseline
    job.teacher_forward = lambda ids: plain_forward(ctx.teacher, ids, group)
    undo = stage.compile(ctx, group)
    try:
        if state is None:
            job.stream.check()  # too little data fails here, before the stage's first checkpoint
        if group.enabled:  # compile (forward and backward) now, not inside the first timed steps
            warm_up(job.loss_fn, [p for _, p in job.params], cfg.batch_size, job.seq_len,
                    ctx.teacher.config.vocab_size, device, lambda: autocast(device, cfg.precision), group)  # fmt: skip
        if state is None:
            run.summary[stage.key] = {"steps": cfg.steps, "tokens": cfg.steps * job.tokens_per_step, "wall_start": run.wall()}
        fitted = fit_summary(stage, memory)
        if fitted is not None:  # a GPU too small for the recipe's micro-batch: the one that fits, same global batch
            run.summary[stage.key]["fitted_to_gpu"] = fitted
            if run.progress != "none":
                print(f"attnedit: {fit_text({'stage': stage.number, 'memory': fit_note(stage, memory)})}", file=sys.stderr)
        reset_peak_memory(device)
        opt = train_stage(run, job, state)
        info = run.summary[stage.key]
        info["peak_memory_bytes"] = peak_memory(device)
        info["est_memory_bytes"] = int(memory.rows[stage.number]["peak"])
        info["compiled"] = group.enabled
        if run.progress != "none":  # in the log too: a later failure (stage 2, saving) keeps this stage's figures
            print(f"attnedit: {stage_done_text(stage.number, info)}", file=sys.stderr)
        if run.recipe.profile_steps and ctx.parallel.profiles:
            try:  # a measurement: if it fails (memory, the profiler), the trained stage stands and the run goes on
                profile = profile_stage(run, job, opt)
            except Exception as e:  # noqa: BLE001
                print(
                    f"attnedit: warning: profiling stage {stage.number} failed ({type(e).__name__}: {first_line(e)}); no profile-stage{stage.number}.json",
                    file=sys.stderr,
                )
            else:
                write_json(run.dir / f"profile-stage{stage.number}.json", profile)
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
    student.gradient_checkpointing, student.checkpointed_layers = False, None
    for p in student.parameters():
        p.requires_grad_(False)


def save_model(run: Run, ctx: Conversion, wdtype: torch.dtype) -> None:
    """``model/`` (with ``attnedit.json``) and ``summary.json`` (with the KV figures ``report`` reads)."""
    from ..eval.kv import kv_figures
    from ..export import save_edited
    from ..export.card import write_card

    run_dir, student = run.dir, ctx.student
    student.to(wdtype)
    try:
        save_edited(student, run_dir / "model", ctx.tokenizer, overwrite=True, recipe=run.recipe)
    except (WriteFailed, *write_errors()) as e:  # a full disk, as OSError or torch's/safetensors' own error
        remove_temp_files(run_dir)
        raise AttnEditError(
            f"could not write the model to {run_dir / 'model'}: {getattr(e, 'reason', None) or write_error_text(e)}; the trained weights are in the "
            f"last checkpoint; free disk space, then run: attnedit convert {run_dir} --resume"
        ) from None
    for info in run.summary.values():
        if isinstance(info, dict):
            info.pop("wall_start", None)
    run.summary["wall_s"] = round(run.wall(), 1)
    run.summary["model"] = "model"  # relative: a run folder copied or moved stays right
    run.summary["kv"] = kv_figures(student.config, ctx.teacher.config, str(wdtype).replace("torch.", ""))  # the dtype saved
    Summary.model_validate(run.summary).write(run_dir)
    write_card(run_dir / "model", student.config, recipe=run.recipe, run_dir=run_dir)  # with the held-out figures
