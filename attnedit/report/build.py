"""``report.md`` for a conversion run folder, from whichever of its inputs exist.

Inputs (all optional, at least one needed): ``model/config.json`` (the edited checkpoint),
``metrics.jsonl`` (training log), and the result files read as their records (:mod:`attnedit.results`):
``summary.json``, ``eval.json``, ``bench.json``, ``passkey.json``. A report reads these artefacts only: it
computes no figure from a model (the KV figures are the ones ``convert`` wrote into ``summary.json``,
else ``bench``'s). Every section whose input is missing says which command makes it. The report and
its PNGs are written into the run folder itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import AttnEditError
from ..eval.bench.format import capacity_table
from ..eval.kv import slides
from ..eval.passkey import filler_note
from ..io import write_text
from ..results import Bench, Passkey, Quality, StageSummary, Summary
from ..tables import human_bytes, markdown_table
from . import plots

INPUTS = ("model/config.json", "metrics.jsonl", Summary.FILE, Quality.FILE, Bench.FILE, Passkey.FILE)


# -------------------------------------------------------------------------------------------- inputs


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path`` (a model's ``config.json`` or ``attnedit.json``), None if the file is
    absent; a one-line error if it is malformed."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AttnEditError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); re-run the command that writes it") from None
    if not isinstance(data, dict):
        raise AttnEditError(f"{path} lacks a JSON object; re-run the command that writes it")
    return data


def tokens_cell(n) -> str:
    if n is None:
        return "-"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


TRAINING_RULES = (
    "- tok/s: the stage's training tokens a second; x T fwd: that against the teacher's plain forward at the same shapes, measured in the same run;",
    "- peak: the stage's peak GPU memory (torch.cuda.max_memory_allocated); plan: the memory plan's estimate of that "
    "peak for the stage as it ran (`attnedit/distributed/memory.py`, the sum the `--dry-run` table's total adds slack "
    "to); plan vs peak: plan / peak - 1, positive where the plan errs high; '-': not recorded (a CPU run has no peak).",
)


def stage_table(runs: list[tuple[str | None, dict[int, StageSummary]]]) -> str | None:
    """A row per run and stage that trained: tokens, time, tok/s and its ratio to the teacher's forward, the measured
    peak next to the memory plan's estimate (summary.json). ``runs``: (name, stages) pairs; one unnamed run has no
    run column. None when no stage is recorded."""
    named = any(name is not None for name, _ in runs)
    rows = []
    for name, stages in runs:
        for n, st in sorted(stages.items()):
            peak, plan = st.peak_memory_bytes, st.est_memory_bytes
            rows.append(
                ([name or "-"] if named else [])
                + [str(n), tokens_cell(st.tokens), "-" if st.wall_s is None else f"{st.wall_s:,.0f} s"]
                + ["-" if st.tok_s is None else f"{st.tok_s:,.0f}", "-" if st.ratio is None else f"{st.ratio:.2f}x"]
                + ["-" if peak is None else human_bytes(peak), "-" if plan is None else human_bytes(plan)]
                + ["-" if not (peak and plan) else f"{100 * (plan / peak - 1):+.0f}%"]
            )
    if not rows:
        return None
    headers = ["stage", "tokens", "time", "tok/s", "x T fwd", "peak", "plan", "plan vs peak"]
    return markdown_table((["run"] if named else []) + headers, rows)


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path, once it is known to be a folder holding at least one of :data:`INPUTS`."""
    run = Path(run_dir)
    if not run.is_dir():
        raise AttnEditError(f"{run} is not a folder; give a run folder written by attnedit convert")
    if not any((run / name).is_file() for name in INPUTS):
        raise AttnEditError(f"{run} holds none of {', '.join(INPUTS)}; give a run folder written by attnedit convert")
    return run


def teacher_name(summary: Summary | None, quality: Quality | None, bench: Bench | None, passkey: Passkey | None) -> str | None:
    """The teacher's name as the run's files record it (eval.json, bench.json, passkey.json, summary.json), or None."""
    names = [
        quality and quality.teacher,
        bench and bench.teacher,
        passkey and passkey.teacher_model,
        summary and summary.teacher,
    ]
    return next((n for n in names if isinstance(n, str)), None)


def read_metrics(path: Path) -> list[dict] | None:
    """``metrics.jsonl`` records that carry a stage and a finite loss (events are skipped); stage 1 -> "stage1"."""
    if not path.is_file():
        return None
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise AttnEditError(f"{path} line {n} is not valid JSON ({e.msg}); fix or remove that line") from None
        if isinstance(r, dict) and "stage" in r and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"]):
            stage = r["stage"]
            records.append({**r, "stage": f"stage{stage}" if isinstance(stage, int) else str(stage)})
    return records


def read_model_config(run: Path) -> dict | None:
    """The edited model's ``config.json`` as a dict, or None."""
    path = run / "model" / "config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    if config.get("model_type") != "attnedit":
        raise AttnEditError(f"{path} is not an attnedit (edited) model config; the run's model/ should come from attnedit")
    return config


# ------------------------------------------------------------------------------------------ sections


def _pm(value, err) -> str:
    if not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:.4g}" if not isinstance(err, (int, float)) else f"{value:.4g} ± {err:.2g}"


def quality_table(quality: Quality) -> str:
    rows = []
    for task, t in quality.tasks.items():
        student, teacher, ratio = t.student or {}, t.teacher or {}, t.ratio or {}
        metrics = [m for m in student if not m.endswith("_stderr")] or [m for m in teacher if not m.endswith("_stderr")]
        for m in metrics:
            r = ratio.get(m)
            rows.append(
                [
                    task,
                    m,
                    _pm(student.get(m), student.get(f"{m}_stderr")),
                    _pm(teacher.get(m), teacher.get(f"{m}_stderr")),
                    "-" if r is None else f"{r:.3f}",
                ]
            )
    return markdown_table(["task", "metric", "student", "teacher", "student / teacher"], rows)


def efficiency_table(bench: Bench) -> str:
    def fig(run, name, key, fmt):
        f = getattr(run, name)
        v = None if f is None else getattr(f, key)
        return "-" if v is None else fmt(v)

    def ratio(run, key):
        v = run.ratio.get(key)
        return "-" if v is None else f"{v:.2f}"

    rows = []
    for r in bench.runs:
        rows.append(
            [
                r.batch,
                r.context,
                fig(r, "student", "ttft_ms", "{:,.1f}".format),
                fig(r, "teacher", "ttft_ms", "{:,.1f}".format),
                ratio(r, "ttft_ms"),
                fig(r, "student", "decode_tok_s", "{:,.0f}".format),
                fig(r, "teacher", "decode_tok_s", "{:,.0f}".format),
                ratio(r, "decode_tok_s"),
                fig(r, "student", "kv_bytes_measured", human_bytes),
                fig(r, "teacher", "kv_bytes_measured", human_bytes),
                ratio(r, "kv_bytes_measured"),
                fig(r, "student", "peak_mem_bytes", human_bytes),
                fig(r, "teacher", "peak_mem_bytes", human_bytes),
            ]
        )
    headers = [
        "batch",
        "context",
        "TTFT ms (S)",
        "TTFT ms (T)",
        "S/T",
        "decode tok/s (S)",
        "decode tok/s (T)",
        "S/T",
        "KV (S)",
        "KV (T)",
        "S/T",
        "peak mem (S)",
        "peak mem (T)",
    ]
    notes = [
        f"- {name}: batch {r.batch} at context {r.context} does not fit in memory; the largest batch that fits is {best}."
        for r in bench.runs
        for name, best in (r.largest_batch or {}).items()
    ]
    return "\n".join([markdown_table(headers, rows)] + ([""] + notes if notes else []))


def kv_series(summary: Summary | None, bench: Bench | None) -> tuple[str, list[int], list[float], list[float]] | None:
    """(dtype, contexts, student and teacher KV bytes per token) from ``summary.json``, else ``bench.json``."""
    for source in (summary, bench):
        kv = source.kv if source is not None else None
        if kv is not None and kv.student and kv.teacher:
            dtype = kv.dtype or getattr(source, "dtype", None) or "bfloat16"
            return dtype, kv.student.contexts, kv.student.bytes_per_token, kv.teacher.bytes_per_token
    return None


def bench_kv_check(bench: Bench) -> str:
    """What the bench says about the KV figures: its cache dtype, and whether the bytes its caches allocated
    equal the analytic figure in every cell it measured."""
    cells = [f for r in bench.runs for f in (r.student, r.teacher) if f is not None]
    pairs = [(f.kv_bytes_measured, f.kv_bytes_analytic) for f in cells]
    pairs = [(m, a) for m, a in pairs if m is not None and a is not None]
    dtype = bench.dtype or "?"
    if not pairs:
        return f"The bench ran with a {dtype} cache and measured no cache bytes."
    off = sum(m != a for m, a in pairs)
    verdict = "equal the analytic figure in every cell" if not off else f"differ from the analytic figure in {off} of {len(pairs)} cells"
    return f"The bench ran with a {dtype} cache; the bytes its caches allocated {verdict}."


def resolved_settings(config: dict) -> dict:
    """The target settings a model was edited with, each default (None or auto) replaced by the value the
    edit chose, as the model's layer list records it; ``full_layers`` with the layers it gave; a setting
    left empty (``q_lora_rank``: no query bottleneck) as ``none``, as settings are written."""
    edit = config.get("edit") or {}
    settings = dict(edit.get("settings") or {})
    layers = config.get("layer_attention") or []
    edited = [layers[i] for i in edit.get("edited_layers", []) if i < len(layers)]
    if edited:
        for key, value in settings.items():
            if (value is None or value == "auto") and key in edited[0]:
                settings[key] = edited[0][key]
    if "full_layers" in settings:
        full = [i for i, x in enumerate(layers) if x.get("layer_type") == "full"]
        settings["full_layers"] = f"{settings['full_layers']} (layers {','.join(map(str, full)) or 'none'})"
    return {k: ("none" if v is None else f"{v:g}" if isinstance(v, float) else v) for k, v in settings.items()}


def passkey_protocol(passkey: Passkey) -> str:
    """How many keys a passkey cell holds and whether each brought its own filler ("5", "20, each with its own
    shuffled filler")."""
    return f"{passkey.trials}{filler_note(passkey.filler)}"


PASSKEY_POINTS = 5  # a passkey cell "holds" where the student is at most this many points below its teacher


def passkey_cells_held(passkey: Passkey | None, points: float = PASSKEY_POINTS) -> tuple[int, int] | None:
    """(cells where the student's accuracy is at most ``points`` points below the teacher's, cells) over the
    (context, depth) grid of one passkey.json, whose teacher read the same keys; None without both grids."""
    if passkey is None or not passkey.student or not passkey.teacher:
        return None
    pairs = [(s, t) for srow, trow in zip(passkey.student, passkey.teacher) for s, t in zip(srow, trow)]
    return sum(s >= t - points / 100 - 1e-9 for s, t in pairs), len(pairs)


def passkey_tables(passkey: Passkey) -> str:
    out = []
    for name in ("student", "teacher"):
        grid = getattr(passkey, name)
        if grid is None:
            continue
        rows = [[c] + [f"{a:.2f}" for a in accs] for c, accs in zip(passkey.contexts, grid)]
        out.append(f"**{name}**\n\n" + markdown_table(["context"] + [f"depth {d:g}" for d in passkey.depths], rows))
    return "\n\n".join(out)


def _or(value, default):
    """A header figure an older file may lack."""
    return default if value is None else value


def _missing(what: str, command: str) -> str:
    return f"_No {what} in this run folder yet. Make it with:_\n\n```\n{command}\n```"


# ------------------------------------------------------------------------------------------- report


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and its PNGs into ``run_dir``; return the report's path."""
    run = check_run_dir(run_dir)
    config = read_model_config(run)
    metrics = read_metrics(run / "metrics.jsonl")
    summary, quality = Summary.read(run), Quality.read(run)
    bench, passkey = Bench.read(run), Passkey.read(run)
    teacher = teacher_name(summary, quality, bench, passkey) or "TEACHER"
    model = f"{run}/model"

    lines = [f"# attnedit report: {run.resolve().name}", ""]
    if config is not None:
        edit = config.get("edit") or {}
        settings = ", ".join(f"{k}={v}" for k, v in resolved_settings(config).items())
        layers = f"{len(edit.get('edited_layers', []))} of {len(config.get('layer_attention') or [])} layers"
        lines += [
            f"Model `{model}`: target **{edit.get('target', '?')}** on {layers} ({settings}); teacher `{teacher}`.",
            "",
        ]
    if summary:
        scalars = [[k, v] for k, v in summary.to_dict().items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
        if scalars:
            lines += ["## Summary", "", markdown_table(["key", "value"], scalars), ""]

    lines += ["## Training", ""]
    warning = summary.regression() if summary else None
    if warning:
        lines += [f"**Warning**: {warning}.", ""]
    if metrics:
        plots.loss_curves(metrics, run / "loss_curves.png")
        per_stage = {}
        for r in metrics:
            per_stage.setdefault(r["stage"], []).append(r)
        rows = [[s, len(rs), rs[-1].get("tokens", "-"), f"{rs[0]['loss']:.4g}", f"{rs[-1]['loss']:.4g}"] for s, rs in sorted(per_stage.items())]
        lines += [
            "![loss curves](loss_curves.png)",
            "",
            markdown_table(["stage", "logged steps", "tokens", "first loss", "last loss"], rows),
        ]
    else:
        lines += [_missing("training log (metrics.jsonl)", f"attnedit convert ...   # writes {run}/metrics.jsonl")]
    table = stage_table([(None, summary.trained_stages() if summary else {})])
    if table:
        lines += ["", "Speed and memory per stage (summary.json):", "", *TRAINING_RULES, "", table]

    lines += ["", "## Quality", ""]
    if quality:
        lines += [
            f"Student vs teacher on the same data (limit: {quality.limit}).",
            "",
            quality_table(quality),
        ]
    else:
        lines += [_missing("quality figures (eval.json)", f"attnedit eval {model} --teacher {teacher} --save {run}/eval.json")]

    lines += ["", "## Efficiency", ""]
    if bench:
        measured = any(r.student or r.teacher for r in bench.runs)
        if measured:
            plots.speed_vs_batch(bench, run / "speed_vs_batch.png")
        lines += [
            (
                f"Device {bench.device}, {bench.dtype}, {_or(bench.decode_tokens, '?')} decode tokens after the "
                f"first, {_or(bench.timing, 'timing')} over {_or(bench.repeats, '?')} runs. KV = bytes the cache holds after "
                "the prefill (whole batch); peak mem = the model's own weights plus the peak it allocates while generating "
                "(null on CPU)."
            ),
            "",
            efficiency_table(bench),
        ]
        if measured:
            lines += ["", "![decode tokens/s and time to first token vs batch](speed_vs_batch.png)"]
        if bench.capacity:
            lines += [
                "",
                "### Serving capacity",
                "",
                "The largest batch each model serves at a context on this device, with its caches, its weights and one "
                "sequence's chunked prefill in memory (each model alone on the device), next to the KV-only limit "
                "(memory less the weights, over one sequence's cache), and its decode step and throughput at that batch.",
                "",
                markdown_table(*capacity_table([row.to_dict() for row in bench.capacity])),
            ]
    else:
        lines += [_missing("efficiency figures (bench.json)", f"attnedit bench {model} --teacher {teacher} --save {run}/bench.json")]

    lines += ["", "## KV cache", ""]
    series = kv_series(summary, bench)
    if series is not None:
        dtype, contexts, student, teacher_kv = series
        plots.kv_vs_context(contexts, student, teacher_kv, dtype, run / "kv_vs_context.png")
        rows = [[c, human_bytes(s), human_bytes(t), f"{s / t:.3f}", human_bytes(s * c), human_bytes(t * c)] for c, s, t in zip(contexts, student, teacher_kv)]
        lines += [
            f"Analytic, from the configs, for a {dtype} cache "
            + ("(the dtype the model is saved in, as `attnedit inspect` prints it)." if summary and summary.kv and summary.kv.student else "(the bench's).")
            + (" " + bench_kv_check(bench) if bench else ""),
            "",
            "![KV bytes vs context](kv_vs_context.png)",
            "",
            markdown_table(["context", "per token (S)", "per token (T)", "S/T", "per sequence (S)", "per sequence (T)"], rows),
        ]
    else:
        lines += [
            _missing(
                "KV figures (summary.json's kv, or bench.json)",
                f"attnedit convert ...   # or: attnedit bench {model} --teacher {teacher} --save {run}/bench.json",
            )
        ]
    if config is None:
        lines += ["", _missing("model checkpoint (model/config.json)", f"attnedit convert ...   # or: attnedit edit {teacher} --target ... --out {model}")]

    lines += ["", "## Long context: passkey retrieval", ""]
    if passkey:
        plots.passkey_heatmaps(passkey, run / "passkey.png")
        windowed = any(slides(layer) for layer in (config or {}).get("layer_attention") or [])
        intro = (
            f"Accuracy per (context, depth) over {passkey.trials} keys{filler_note(passkey.filler)}"
            + "; depth 0 puts the key at the start of the filler, 1 right before the question."
            + (" Sliding layers only see their window, so this shows what the full layers (and sink tokens) keep." * windowed)
        )
        held = passkey_cells_held(passkey)
        if held:
            intro += f" The student is at most {PASSKEY_POINTS} points below the teacher in **{held[0]} of {held[1]}** cells (the same keys for both)."
        lines += [intro, "", "![passkey accuracy](passkey.png)", "", passkey_tables(passkey)]
    else:
        lines += [
            _missing(
                "passkey results (passkey.json)",
                f"attnedit passkey {model} --teacher {teacher} --save {run}/passkey.json",
            )
        ]

    out = run / "report.md"
    write_text(out, "\n".join(lines) + "\n")
    return out
