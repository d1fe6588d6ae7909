"""``attnedit convert``: one recipe, one run folder: edit -> stage 1 -> stage 2 -> saved model.

The run folder holds ``recipe.yaml`` (fully resolved), ``metrics.jsonl``, ``checkpoints/``,
``summary.json`` and, at the end, ``model/`` (an ordinary Hugging Face checkpoint with remote code).
Every stage checkpoints as it goes, so ``convert RUN --resume`` continues any interrupted run and
reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch

from .. import distributed
from ..distributed import checkpoint as dcp_checkpoint
from ..errors import AttnEditError
from ..recipe import Recipe, diff, load_recipe, to_yaml
from ..tables import human_bytes, text_table
from . import stage1, stage2
from .checkpoint import list_checkpoints, load_latest, remove_temp_files, write_error_text, write_errors
from .speed import CompileGroup, compile_wanted, peak_memory, reset_peak_memory, teacher_forward_tok_s, warm_up
from .trainer import Run, StageJob, autocast, load_weights, train_stage, use_bf16


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AttnEditError(f"device={name} but no CUDA GPU is visible; set device=cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise AttnEditError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def weights_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """Frozen weights in bf16 only when every stage computes in bf16 (fp32 math cannot take bf16 weights)."""
    if recipe.weights_dtype != "auto":
        return getattr(torch, recipe.weights_dtype)
    bf16 = all(use_bf16(device, s.precision) for s in (recipe.stage1, recipe.stage2))
    return torch.bfloat16 if bf16 else torch.float32


def stage_seq_len(recipe: Recipe, stage: int) -> int:
    cfg = recipe.stage1 if stage == 1 else recipe.stage2
    return cfg.seq_len or recipe.data.seq_len


def check_seq_len(recipe: Recipe, config) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    longest = max(recipe.data.seq_len, stage_seq_len(recipe, 1), stage_seq_len(recipe, 2))
    if limit and longest > limit:
        raise AttnEditError(
            f"seq_len {longest} is above the teacher's max_position_embeddings {limit}; lower data.seq_len / stageN.seq_len"
        )


def owned_parameters(student, teacher) -> list[tuple[str, torch.nn.Parameter]]:
    """The student's weights that are not the teacher's: what training changes and checkpoints hold."""
    teacher_ids = {id(p) for p in teacher.parameters()}
    return [(n, p) for n, p in student.named_parameters() if id(p) not in teacher_ids]


# ----------------------------------------------------------------------------------- the plan


def _ranges(indices: list[int]) -> str:
    out, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


def _activation_bytes(recipe: Recipe, stage: int, config, n_edited: int, abytes: int, device: torch.device) -> float:
    """A rough upper figure for the activations one micro-batch keeps for the backward pass."""
    cfg = recipe.stage1 if stage == 1 else recipe.stage2
    b, t = cfg.batch_size, stage_seq_len(recipe, stage)
    h, heads = config.hidden_size, config.num_attention_heads
    inter = getattr(config, "intermediate_size", 4 * h)
    scores = b * heads * t * t * 2 * abytes if device.type == "cpu" else 0  # no fused attention kernel on CPU
    if stage == 1:
        return n_edited * (b * t * h * (2 * abytes + 12 * abytes) + scores)
    layers = config.num_hidden_layers
    logits = min(cfg.kl_chunk, b * t) * config.vocab_size * 4 * 5
    return layers * (b * t * (14 * h + 4 * inter) * abytes + scores) + logits


def make_plan(recipe: Recipe) -> dict:
    """What ``convert`` will do, from configs alone (no weights are loaded): the ``--dry-run`` output."""
    from ..data import check_files
    from ..eval.inspect import count_parameters
    from ..eval.kv import kv_summary
    from ..surgery import edited_config
    from ..targets import AttnEditForCausalLM
    from ..teachers import load_config

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
    context = max(recipe.data.seq_len, 8192)
    kv_t, kv_s = kv_summary(config, context, "bfloat16"), kv_summary(edited, context, "bfloat16")
    wbytes = torch.finfo(wdtype).bits // 8
    stages = []
    for n, cfg in ((1, recipe.stage1), (2, recipe.stage2)):
        if n == 1:
            trainable = new_params
        else:
            trainable = sum(p.numel() for _, p in stage2.trainable(meta, cfg.trainable))
        bf16 = use_bf16(device, cfg.precision)
        copies = (trainable - new_params) * 4  # fp32 copies of teacher modules that stage 2 trains
        memory = teacher_params * wbytes + new_params * 4 + copies + trainable * 12
        memory += _activation_bytes(recipe, n, config, len(layers), 2 if bf16 else 4, device)
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
                "memory_bytes": memory if cfg.steps else 0,
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
        "device": str(device),
        "weights_dtype": str(wdtype).replace("torch.", ""),
        "stages": stages,
        "checkpoint_every": recipe.checkpoint_every,
    }


def format_plan(plan: dict) -> str:
    kv = plan["kv_bytes_per_token"]
    files = [Path(f) for f in plan["data_files"]]
    names = ", ".join(f.name for f in files[:2]) + (f" (+{len(files) - 2} more)" if len(files) > 2 else "")
    shown = f"{files[0].parent}/: {names}" if len({f.parent for f in files}) == 1 else names
    settings = ", ".join(f"{k}={v}" for k, v in plan["target_args"].items() if v is not None)
    lines = [
        f"teacher          {plan['teacher']} ({plan['family']}, {plan['num_layers']} layers, {plan['teacher_params']:,} params, vocab {plan['vocab_size']:,})",
        f"target           {plan['target']}: {settings}",
        f"edited layers    {_ranges(plan['edited_layers'])} ({len(plan['edited_layers'])} of {plan['num_layers']})",
        f"new params       {plan['new_params']:,} (replacing {plan['replaced_params']:,} teacher attention params)",
        (
            f"KV cache         {human_bytes(kv['teacher'])}/token -> {human_bytes(kv['edited'])}/token "
            f"({kv['edited'] / kv['teacher']:.1%} of the teacher's, bf16, context {plan['kv_context']:,})"
        ),
        f"data             {len(files)} file(s) in {shown}; blocks of {plan['seq_len']} tokens",
        f"device           {plan['device']}, frozen weights {plan['weights_dtype']}",
        f"checkpoints      every {plan['checkpoint_every']} steps and at each stage's end",
        "",
    ]
    rows = []
    for s in plan["stages"]:
        skipped = s["steps"] == 0
        rows.append(
            [
                f"stage {s['stage']}",
                s["steps"],
                "-" if skipped else s["batch"],
                s["tokens"],
                "-" if skipped else s["lr"],
                s["trainable_params"],
                "-" if skipped else s["precision"],
                "skipped" if skipped else "~" + human_bytes(s["memory_bytes"]),
            ]
        )
    headers = ["stage", "steps", "batch x accum x seq", "tokens", "lr", "trainable", "precision", "est. memory"]
    lines.append(text_table(headers, rows, right={1, 3, 5}))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- the run


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise AttnEditError(f"could not write {path}: {e.strerror or e}; free disk space and retry") from None


def check_new_run_dir(run_dir: Path) -> None:
    """A new run needs a folder that does not exist yet (or is empty); nothing is written here."""
    if run_dir.exists() and not run_dir.is_dir():
        raise AttnEditError(f"{run_dir} is a file; give a folder for the run (--out)")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise AttnEditError(f"{run_dir} already exists; continue it with --resume, or choose another --out")


def prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool) -> None:
    """A new run folder gets the resolved recipe (and its sha256); a resumed one must have been started
    with the same recipe, and its recipe.yaml must be the one written then."""
    saved = run_dir / "recipe.yaml"
    checksum = run_dir / "recipe.yaml.sha256"
    if resume:
        if run_dir.exists() and not run_dir.is_dir():
            raise AttnEditError(f"{run_dir} is a file, not a run folder to resume")
        if not saved.is_file():
            raise AttnEditError(f"{run_dir} has no recipe.yaml, so it is not a run to resume; start it without --resume")
        if checksum.is_file() and checksum.read_text().split()[:1] != [hashlib.sha256(saved.read_bytes()).hexdigest()]:
            raise AttnEditError(
                f"{saved} was edited after the run started (its sha256 differs from {checksum.name}); put it back as it was "
                f"to resume, or start a new run from the edited recipe with another --out"
            )
        old = load_recipe(saved)
        changed = sorted(diff(old, recipe))
        if changed:
            first = changed[0]
            raise AttnEditError(
                f"{run_dir} was started with a different recipe ({len(changed)} field(s) differ, e.g. {first}); "
                f"resume with its own recipe (attnedit convert {run_dir} --resume) or choose another --out"
            )
        return
    check_new_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = to_yaml(recipe, "the fully resolved recipe of this run (attnedit convert)")
    _write_atomic(checksum, f"{hashlib.sha256(text.encode()).hexdigest()}  recipe.yaml\n")
    _write_atomic(saved, text)


def validate_start(recipe: Recipe) -> None:
    """What can fail from configs and files alone (family, target settings, seq_len, data files), checked
    before a new run folder is written."""
    from ..data import check_files
    from ..surgery import edited_config
    from ..teachers import load_config

    config = load_config(recipe.teacher)
    check_seq_len(recipe, config)
    edited_config(config, recipe.target, recipe.target_args)
    check_files(recipe.data)
    resolve_device(recipe.device)


def calibration_ids(recipe: Recipe, tokenizer, hidden_size: int) -> torch.Tensor:
    """Blocks of the run's own training data (never the held-out documents) for the teacher
    initialisation of MLA, instead of random token ids."""
    from ..data import BlockStream

    seq = min(recipe.data.seq_len, 256)
    held = -(-recipe.data.heldout_blocks * recipe.data.seq_len // seq)
    data = dataclasses.replace(recipe.data, seq_len=seq, heldout_blocks=held)
    n = max(4, min(16, -(-2 * hidden_size // seq)))  # about twice the hidden size in tokens
    return BlockStream(data, tokenizer, seed=recipe.seed, prefetch=False).next_batch(n)


def _stage_job(stage: int, recipe: Recipe, teacher, student, tokenizer, group: CompileGroup | None = None) -> StageJob:
    from ..data import BlockStream, DeviceBatches

    cfg = recipe.stage1 if stage == 1 else recipe.stage2
    seq = stage_seq_len(recipe, stage)
    # each stage reads its own shuffle of the data (seed + stage - 1), at its own sequence length, and
    # holds out at least the documents of the held-out blocks (counted at data.seq_len)
    held = -(-recipe.data.heldout_blocks * recipe.data.seq_len // seq)
    data = dataclasses.replace(recipe.data, seq_len=seq, heldout_blocks=held)
    # batches reach the device one ahead of training (pinned, non-blocking on CUDA); resume stays exact
    stream = DeviceBatches(BlockStream(data, tokenizer, seed=recipe.seed + stage - 1), resolve_device(recipe.device))
    if stage == 1:
        params, loss_fn = stage1.trainable(student), stage1.make_loss(teacher, student, group)
    else:
        params, loss_fn = stage2.trainable(student, cfg.trainable), stage2.make_loss(teacher, student, cfg)
        student.gradient_checkpointing = cfg.gradient_checkpointing
        # the layer loop checkpoints only in training mode; set the flag on the top module alone, so the
        # shared teacher modules stay in eval mode (no dropout or router noise in the teacher)
        student.training = cfg.gradient_checkpointing
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    return StageJob(stage, cfg, params, loss_fn, stream, seq)


def _estimate(recipe: Recipe, stage: int) -> float:
    """The ``--dry-run`` memory estimate of ``stage`` (bytes)."""
    return next(s["memory_bytes"] for s in make_plan(recipe)["stages"] if s["stage"] == stage)


def _teacher_baselines(recipe: Recipe, teacher, device: torch.device, state: dict | None, quiet: bool) -> dict[int, float]:
    """Tokens/s of the teacher's plain forward at the batch shape of each stage still to run (this session's hardware)."""
    out: dict[int, float] = {}
    if recipe.baseline_batches == 0:
        return out
    for stage in (1, 2):
        cfg = recipe.stage1 if stage == 1 else recipe.stage2
        if cfg.steps == 0 or _finished(state, stage):
            continue
        out[stage] = teacher_forward_tok_s(
            teacher, cfg.batch_size, stage_seq_len(recipe, stage), device,
            lambda cfg=cfg: autocast(device, cfg.precision), recipe.baseline_batches,
        )  # fmt: skip
        if not quiet:
            print(f"attnedit: teacher plain forward at stage {stage}'s batch ({cfg.batch_size} x {stage_seq_len(recipe, stage)}): {out[stage]:,.0f} tok/s", file=sys.stderr)
    return out


def _finished(state: dict | None, stage: int) -> bool:
    return state is not None and (state["stage"] > stage or (state["stage"] == stage and state["done"]))


def convert(recipe: Recipe, run_dir: str | os.PathLike, resume: bool = False, progress: str = "auto") -> dict:
    """Run a recipe into ``run_dir`` (or continue it with ``resume``); return the summary."""
    from ..data import resolve_tokenizer
    from ..surgery import edit_model
    from ..teachers import load_model

    run_dir = Path(run_dir)
    if resume:
        prepare_run_dir(recipe, run_dir, resume)
        if (run_dir / "summary.json").is_file() and (run_dir / "model").is_dir():
            print(f"attnedit: {run_dir} has already finished; its model is in {run_dir / 'model'}", file=sys.stderr)
            return json.loads((run_dir / "summary.json").read_text())
    else:  # a failed start must not leave a folder that refuses both a new start and --resume
        check_new_run_dir(run_dir)
        validate_start(recipe)
    distributed.barrier()  # issue 13: every rank has checked the folder before rank 0 creates it
    if not distributed.is_main():
        progress = "none"
    device = resolve_device(recipe.device)
    wdtype = weights_dtype(recipe, device)
    teacher, teacher_tok = load_model(recipe.teacher, dtype=wdtype, device=device)
    check_seq_len(recipe, teacher.config)
    tokenizer = resolve_tokenizer(recipe.data, teacher_tok, teacher.config.vocab_size)
    teacher.requires_grad_(False)
    calib = None
    if recipe.target == "mla" and recipe.target_args.get("init") == "teacher":
        calib = calibration_ids(recipe, tokenizer, teacher.config.hidden_size)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    student = edit_model(teacher, recipe.target, recipe.target_args, calibration_ids=calib)
    layers = student.config.edit["edited_layers"]
    for i in layers:
        student.attentions()[i].float()  # trained weights stay fp32 (AdamW master copies); autocast does the rest
    existed = run_dir.exists()
    if not resume and distributed.is_main():  # issue 13: rank 0 writes the run folder
        prepare_run_dir(recipe, run_dir, resume)
    distributed.barrier()
    try:
        return _run(recipe, run_dir, resume, progress, teacher, student, tokenizer, device, wdtype)
    except Exception as e:
        # a new run that fails before its first checkpoint leaves nothing behind: the same --out starts
        # again once the input is fixed (a failed checkpoint write says to resume: that folder stays)
        saved = list_checkpoints(run_dir) or dcp_checkpoint.list_checkpoints(run_dir)  # issue 13: DCP ones count
        if not resume and not saved and not getattr(e, "resumable", False) and distributed.is_main():
            for p in list(run_dir.iterdir()) if existed else [run_dir]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise


def _run(recipe: Recipe, run_dir: Path, resume: bool, progress: str, teacher, student, tokenizer, device, wdtype) -> dict:
    """Train the stages (from the last good checkpoint when resuming) and save the model."""
    from ..data import heldout_blocks
    from ..export import save_edited

    layers = student.config.edit["edited_layers"]
    state = load_latest(run_dir) if resume and not distributed.is_distributed() else None
    if resume and distributed.is_distributed():  # issue 13: DCP checkpoints, weights read whole
        state = dcp_checkpoint.load_latest(run_dir, owned=owned_parameters(student, teacher))
    summary = state["summary"] if state else {"teacher": recipe.teacher, "target": recipe.target, "edited_layers": layers}
    run = Run(run_dir, recipe, device, summary, progress)
    if state is not None:
        if state["stage"] == 2:
            stage2.unshare(student, teacher, recipe.stage2.trainable)
        load_weights(owned_parameters(student, teacher), state)
        run.metrics.truncate(state["metrics_offset"])
    elif resume:
        run.metrics.truncate(0)  # no checkpoint was ever written: the run starts over, its lines too
    blocks = heldout_blocks(recipe.data, tokenizer) if recipe.heldout_eval else None
    evaluate = None
    if blocks is not None and len(blocks):

        def evaluate():
            def ctx():
                return autocast(device, recipe.stage2.precision)

            return stage2.heldout_losses(teacher, student, blocks, recipe.stage2.batch_size, recipe.stage2.kl_chunk, ctx)

        if "heldout_before" not in run.summary:
            run.summary["heldout_before"] = evaluate()
    baselines = _teacher_baselines(recipe, teacher, device, state, quiet=run.progress == "none")
    with run.stop_on_signals():
        for stage in (1, 2):
            cfg = recipe.stage1 if stage == 1 else recipe.stage2
            if cfg.steps == 0 or _finished(state, stage):
                continue
            if stage == 2:
                stage2.unshare(student, teacher, cfg.trainable)
            run.owned = owned_parameters(student, teacher)
            what = "the stage-1 attentions" if stage == 1 else "the stage-2 decoder layers"
            group = CompileGroup(compile_wanted(cfg.compile, device), what)
            job = _stage_job(stage, recipe, teacher, student, tokenizer, group)
            if distributed.is_distributed():  # issue 13: FSDP2 plan, this rank's share of every batch
                from ..distributed.data_parallel import distribute

                job.model = student
                distribute(job, teacher, student, run)
            job.teacher_fwd_tok_s = baselines.get(stage)
            undo = stage2.compile_layers(student, group) if stage == 2 else (lambda: None)
            try:
                resume_state = state if state is not None and state["stage"] == stage else None
                if resume_state is None:
                    job.stream.check()  # too little data fails here, before the stage's first checkpoint
                if group.enabled:  # compile (forward and backward) now, not inside the first timed steps
                    warm_up(job.loss_fn, [p for _, p in job.params], cfg.batch_size, job.seq_len,
                            teacher.config.vocab_size, device, lambda cfg=cfg: autocast(device, cfg.precision), group)  # fmt: skip
                if resume_state is None:
                    run.summary[f"stage{stage}"] = {"steps": cfg.steps, "tokens": cfg.steps * job.tokens_per_step, "wall_start": run.wall()}
                reset_peak_memory(device)
                train_stage(run, job, resume_state)
                info = run.summary[f"stage{stage}"]
                info["peak_memory_bytes"] = peak_memory(device)
                info["est_memory_bytes"] = int(_estimate(recipe, stage))
                info["compiled"] = group.enabled
            finally:
                undo()
                job.stream.close()
            state = None
    student.eval()
    student.gradient_checkpointing = False
    for p in student.parameters():
        p.requires_grad_(False)
    if evaluate is not None:
        run.summary["heldout_after"] = evaluate()
    if distributed.is_distributed():  # issue 13: whole weights on rank 0, which alone writes the model
        from ..distributed.fsdp import gather_full

        gather_full(student, keep=distributed.is_main())
        if not distributed.is_main():
            return run.summary
    student.to(wdtype)
    try:
        save_edited(student, run_dir / "model", tokenizer, overwrite=True)
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
    _write_atomic(run_dir / "summary.json", json.dumps(run.summary, indent=2) + "\n")
    return run.summary


def format_summary(summary: dict) -> str:
    lines = []
    for stage in (1, 2):
        info = summary.get(f"stage{stage}")
        if info:
            final = info.get("final", {})
            speed = ""
            if info.get("tok_s"):
                speed = f", {info['tok_s']:,.0f} tok/s"
                if info.get("ratio"):
                    speed += f" ({info['ratio']:.2f}x the teacher's forward)"
            if info.get("peak_memory_bytes"):
                speed += f", peak {human_bytes(info['peak_memory_bytes'])} (est. {human_bytes(info['est_memory_bytes'])})"
            lines.append(
                f"stage {stage}: {info['steps']} steps, {info['tokens']:,} tokens, {info.get('wall_s', 0):.0f} s{speed}, "
                f"final loss {final.get('loss', float('nan')):.4f}"
            )
    before, after = summary.get("heldout_before"), summary.get("heldout_after")
    if before and after:
        lines.append(
            f"held-out KL(teacher||student) {before['kl']:.4f} -> {after['kl']:.4f}; "
            f"student CE {before['student_ce']:.4f} -> {after['student_ce']:.4f} (teacher {after['teacher_ce']:.4f})"
        )
    lines.append(f"wall time {summary.get('wall_s', 0):.0f} s; model saved to {summary.get('model')}")
    return "\n".join(lines)
