"""Text for people: the ``--dry-run`` plan and the end-of-run summary that ``attnedit convert`` prints."""

from __future__ import annotations

import os
from pathlib import Path

from ..distributed.memory import checkpointing_text
from ..results import Summary
from ..tables import human_bytes, text_table


def _ranges(indices: list[int]) -> str:
    out, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


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
            f"({kv['edited'] / kv['teacher']:.1%} of the teacher's, {plan.get('kv_dtype', 'bfloat16')}, context {plan['kv_context']:,})"
        ),
        f"data             {len(files)} file(s) in {shown}; blocks of {plan['seq_len']} tokens"
        + (f"; recall spans in {100 * plan['recall_fraction']:g}% of stage-2 blocks" if plan.get("recall_fraction") else "")
        + (f", each copied {plan['recall_min_distance']}+ tokens after its source" if plan.get("recall_fraction") and plan.get("recall_min_distance") else ""),
        f"device           {plan['device']} ({plan['parallel']}), frozen weights in {plan['weights_dtype']}"
        + (f", GPU memory {human_bytes(plan['gpu_bytes'])}" if plan.get("gpu_bytes") else ""),
        f"checkpoints      every {plan['checkpoint_every']} steps and at each stage's end",
    ]
    lines += [f"note             {n}" for n in plan.get("notes", [])]
    evaluation = plan.get("eval") or ["none (the recipe's eval: section asks for nothing)"]
    lines += [f"{'evaluation' if i == 0 else '':<17}{line}" for i, line in enumerate(evaluation)]
    if plan.get("eval"):
        lines.append(f"{'':<17}then report.md; student next to teacher, after the model is saved")
        lines.append(f"{'':<17}(perplexity, passkey and bench first, few-shot tasks last; finished figures kept for --resume)")
    lines.append("")
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
    fitted = [line for line in (fit_text(s) for s in plan["stages"]) if line]
    if fitted:
        lines.append("")
        lines += [f"{'memory' if i == 0 else '':<17}{line}" for i, line in enumerate(fitted)]
    return "\n".join(lines)


def fit_text(row: dict) -> str | None:
    """How a planned stage meets the GPU, in one line (None where it runs as the recipe says, or nothing is fitted)."""
    note = row.get("memory")
    if not note or note["gpu_bytes"] is None:
        return None
    gpu, stage = human_bytes(note["gpu_bytes"]), row["stage"]
    asked = (
        f"stage {stage} at the recipe's micro-batch of {note['asked_batch_size']} needs {human_bytes(note['asked_total'])} (slack and CUDA context included)"
    )
    if not note["fits"]:
        return f"{asked}: it fits the GPU's {gpu} at no micro-batch; convert refuses it (--world-size N: the GPU count that fits)"
    if not note["adapted"]:
        return None
    checkpointing = f", {checkpointing_text(note)}" if note["gradient_checkpointing"] else ""
    return (
        f"{asked}, more than the GPU's {gpu}: convert runs it at micro-batch {note['batch_size']} with grad_accum "
        f"{note['grad_accum']}{checkpointing} (the same global batch), {human_bytes(note['total'])}"
    )


def format_memory_plan(plan: dict, smallest: tuple[int | None, str | None] | None = None, smallest_fitted: int | None = None, largest_count: int = 64) -> str:
    """The per-GPU memory table of ``attnedit.stages.plan.memory_plan`` (``--dry-run --world-size N``)."""
    n = plan["world_size"]
    lines = [f"memory per GPU on {n} GPU(s) (bf16 frozen weights, fp32 trained weights + AdamW; estimates)"]
    for mode, opt in plan["options"].items():
        rows = [
            [f"stage {s['stage']}", f"{s['micro_batch']} x {s['seq_len']}", *(human_bytes(s[k]) for k in
             ("frozen_weights", "trained_weights", "grads", "optimizer", "activations", "buffers", "total"))]
            for s in opt["stages"]
        ]  # fmt: skip
        fits = "" if plan["gpu_bytes"] is None else (" fits" if opt["fits"] else " does NOT fit")
        lines.append(f"\nfrozen weights {_done(mode)}{fits}" + (f" in {human_bytes(plan['gpu_bytes'])}" if plan["gpu_bytes"] else ""))
        headers = ["stage", "micro-batch/rank", "frozen", "trained", "grads", "AdamW", "activations", "FSDP buffers", "total"]
        lines.append(text_table(headers, rows, right=set(range(2, 9))))
    for stage, row in sorted(plan.get("fitted", {}).items()):
        where = f"frozen weights {_done(plan['frozen'])}"
        if row is None:
            lines.append(f"\nstage {stage} fits {human_bytes(plan['gpu_bytes'])} at no micro-batch ({where})")
        else:
            checkpointing = f", {checkpointing_text(row)}" if row["gradient_checkpointing"] else ""
            lines.append(
                f"\nstage {stage} fitted ({where}): micro-batch {row['micro_batch']} x {row['seq_len']} per GPU with grad_accum "
                f"{row['grad_accum']}{checkpointing} (the same global batch), {human_bytes(row['total'])}"
            )
    if smallest is not None:
        k, mode = smallest
        gpu = human_bytes(plan["gpu_bytes"])
        lines.append(f"\nsmallest GPU count that fits {gpu}: {k} (frozen weights {_done(mode)})" if k else f"\nno GPU count up to {largest_count} fits {gpu}")
        if smallest_fitted and smallest_fitted != k:
            lines.append(f"smallest GPU count that fits {gpu} with the micro-batches fitted to it: {smallest_fitted}")
    return "\n".join(lines)


def _done(mode: str) -> str:
    return "sharded" if mode == "shard" else "replicated"


def speed_text(info: dict) -> str:
    """A stage's tokens/s and their ratio to the teacher's forward, from its summary entry (which has ``tok_s``)."""
    return f"{info['tok_s']:,.0f} tok/s" + (f" ({info['ratio']:.2f}x the teacher's forward)" if info.get("ratio") else "")


def stage_done_text(number: int, info: dict) -> str:
    """convert's line at a stage's end: its speed next to the teacher's forward, its peak memory next to the plan."""
    parts = [f"stage {number} done"]
    if info.get("tok_s"):
        parts.append(speed_text(info))
    if info.get("peak_memory_bytes"):
        parts.append(f"peak {human_bytes(info['peak_memory_bytes'])} (plan {human_bytes(info['est_memory_bytes'])})")
    parts.append("compiled" if info.get("compiled") else "eager")
    return ", ".join(parts)


def format_summary(summary: dict, run_dir: str | os.PathLike | None = None) -> str:
    """convert's printed summary; the saved model's folder is named from ``run_dir`` (summary.json keeps it relative)."""
    lines = []
    for stage in (1, 2):
        info = summary.get(f"stage{stage}")
        if info:
            final = info.get("final", {})
            speed = f", {speed_text(info)}" if info.get("tok_s") else ""
            if info.get("peak_memory_bytes"):
                speed += f", peak {human_bytes(info['peak_memory_bytes'])} (est. {human_bytes(info['est_memory_bytes'])})"
            lines.append(
                f"stage {stage}: {info['steps']} steps, {info['tokens']:,} tokens, {info.get('wall_s', 0):.0f} s{speed}, "
                f"final loss {final.get('loss', float('nan')):.4f}"
            )
    for suffix in ("", "_long"):
        before, after = summary.get(f"heldout_before{suffix}"), summary.get(f"heldout_after{suffix}")
        if before and after:
            blocks = f" ({after['seq_len']:,}-token blocks)" if after.get("seq_len") else ""
            lines.append(
                f"held-out KL(teacher||student){blocks} {before['kl']:.4f} -> {after['kl']:.4f}; "
                f"student CE {before['student_ce']:.4f} -> {after['student_ce']:.4f} (teacher {after['teacher_ce']:.4f})"
            )
    warning = Summary.model_validate(summary).regression()
    if warning:
        lines.append(f"warning: {warning}")
    model = summary.get("model")
    where = Path(run_dir) / model if run_dir is not None and model else model
    lines.append(f"wall time {summary.get('wall_s', 0):.0f} s; model saved to {where}")
    return "\n".join(lines)
