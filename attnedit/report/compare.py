"""Several run folders side by side (``attnedit report RUN RUN ... --out FILE.md``): one row per run, for
ablation tables.

The Markdown file has four parts:

1. **Runs**: one row per run and one for the teacher. The run's name (its folder's), its target, the
   settings that differ between the runs (``target_args`` such as ``window``/``sink``/``full_layers``/
   ``gate``/``kv_lora_rank``/``init``, the stages' steps, stage 2's sequence length, ``trainable``,
   ``feature_weight``, ...: only the columns whose values differ), the tokens of each stage (always), the KV
   cache as % of the teacher's at the largest context of the run's KV figures, the held-out KL after
   stage 2, WikiText-2 perplexity per window with its change vs the teacher in %, the mean zero-shot
   accuracy with its difference vs the teacher in points, passkey accuracy per context (mean over
   depths), and how many passkey cells (context x depth) the student holds within 5 points of the teacher.
2. **Training: speed and memory**: a row per run and stage that trained: its tokens and time, its tokens/s and
   their ratio to the teacher's plain forward at the same shapes (measured in the same run), and on a GPU the
   stage's measured peak memory next to the memory plan's estimate of it.
3. **Zero-shot accuracy per task**: rows tasks, columns each teacher and each run.
4. **Passkey retrieval**: each run's grid (context x depth), the teachers' first.

Rules, also written into the file:

* zero-shot accuracy is ``acc_norm`` where the task reports it, else ``acc`` (lm-evaluation-harness
  reports both for arc_easy, arc_challenge, hellaswag and piqa, only ``acc`` for winogrande; ``report.md``
  lists both). A run's mean is over the few-shot tasks of its ``eval.json``.
* a run's changes vs the teacher are against the teacher figures in the run's own files (same data, same
  settings); where a run has none, against its teacher's row. Runs of several teachers get one teacher row
  each (a teacher named by its model name, a local file by its file name); a teacher's row takes each figure from
  the first of its runs that has it, and a run whose teacher figures differ from its row's gets a note.
* ``-``: the run folder lacks that input (the notes under the table say which files are missing; a run stopped
  in training, with no ``summary.json``, gets a note saying after which step, from ``metrics.jsonl``, and the
  command that resumes it when the folder keeps a checkpoint).

Every figure comes from the run folders' files, read as their records (:mod:`attnedit.results`):
``summary.json`` (tokens, held-out KL, KV figures; ``bench.json``'s KV when the summary has none),
``eval.json`` (else the pieces a stopped evaluation finished, ``eval.progress.json``, with a note saying so),
``passkey.json``, and the settings from ``recipe.yaml`` (else the recipe in
``model/attnedit.json``, else the edit settings in ``model/config.json``). Each run's figures are one
:class:`RunFigures`: the student's and the teacher's :class:`Figures` (perplexity per window, zero-shot
accuracy per task, passkey accuracy per context) side by side. No model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import AttnEditError
from ..eval.progress import progress_path, read_kept
from ..eval.quality import PPL_TASK
from ..io import write_text
from ..results import CHECKPOINT_DIR, Bench, Passkey, Quality, StageSummary, Summary, list_checkpoints
from ..tables import markdown_table
from .build import (
    PASSKEY_POINTS,
    TRAINING_RULES,
    check_run_dir,
    kv_series,
    passkey_cells_held,
    passkey_protocol,
    read_json,
    read_metrics,
    read_model_config,
    stage_table,
    teacher_name,
    tokens_cell,
)

STAGE_SETTINGS = (
    "stage1.steps",
    "stage2.steps",
    "stage2.seq_len",
    "stage2.trainable",
    "stage2.feature_weight",
    "stage2.ce_weight",
    "stage1.lr",
    "stage2.lr",
)
ZERO_SHOT_RULE = (
    "acc_norm where the task reports it, else acc (lm-evaluation-harness reports both for arc_easy, arc_challenge, "
    "hellaswag and piqa, only acc for winogrande; report.md lists both)"
)
FILES = ("recipe.yaml", Summary.FILE, Quality.FILE, Passkey.FILE)


# -------------------------------------------------------------------------------------- one run's figures


@dataclass
class Accuracy:
    """A few-shot task's accuracy (``metric``: acc_norm or acc) and its standard error."""

    value: float
    stderr: float | None
    metric: str


@dataclass
class Figures:
    """One model's quality figures as a run's files record them."""

    ppl: dict[int | None, float] = field(default_factory=dict)  # window (None: not recorded) -> WikiText-2 perplexity
    accuracy: dict[str, Accuracy] = field(default_factory=dict)  # few-shot task -> zero-shot accuracy
    passkey: dict[int, float] = field(default_factory=dict)  # context -> passkey accuracy, mean over depths

    def labelled(self) -> dict[str, float]:
        """Every figure by a label for people (``ppl@2048``, ``zs:arc_easy``, ``passkey@4096``)."""
        out = {("ppl" if w is None else f"ppl@{w}"): v for w, v in self.ppl.items()}
        out.update({f"zs:{t}": a.value for t, a in self.accuracy.items()})
        out.update({f"passkey@{c}": v for c, v in self.passkey.items()})
        return out


@dataclass
class RunFigures:
    """One run folder's figures: its settings, what it trained, its KV and held-out KL, and the student's and
    the teacher's figures from its own files (the teacher's as this run measured it)."""

    run: str
    path: str
    settings: dict[str, Any] = field(default_factory=dict)  # recipe fields by name: teacher, target, target_args.*, stageN.*
    tokens: dict[int, int | None] = field(default_factory=dict)  # stage -> tokens trained (0: skipped)
    kv_context: int | None = None
    kv_percent: float | None = None
    heldout_kl: float | None = None
    student: Figures = field(default_factory=Figures)
    teacher: Figures = field(default_factory=Figures)
    passkey: Passkey | None = None
    teacher_model: str | None = None
    missing: list[str] = field(default_factory=list)
    stopped_pieces: int = 0  # no eval.json: the figures are the pieces a stopped evaluation finished (eval.progress.json)
    stopped_training: str | None = None  # no summary.json: where its training stopped, and how to go on (a note)
    stages: dict[int, StageSummary] = field(default_factory=dict)  # stage -> what it did (summary.json)


@contextmanager
def _layout(*paths: Path):
    """Values that do not have the layout attnedit writes: one line naming the file(s) they came from."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise AttnEditError(
            f"{' or '.join(str(p) for p in paths)} does not have the layout attnedit writes ({type(e).__name__}: {e}); re-run the command that writes it"
        ) from None


def read_recipe(run: Path) -> dict | None:
    """The run's resolved recipe as a plain mapping: ``recipe.yaml``, else the one in ``model/attnedit.json``."""
    path = run / "recipe.yaml"
    if path.is_file():
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise AttnEditError(
                f"{path} is not valid YAML ({first}); put back the recipe.yaml attnedit convert wrote (its sha256 is in recipe.yaml.sha256)"
            ) from None
        if not isinstance(raw, dict):
            raise AttnEditError(f"{path} is not a recipe (a YAML mapping); put back the recipe.yaml attnedit convert wrote")
        return raw
    provenance = read_json(run / "model" / "attnedit.json")
    recipe = (provenance or {}).get("recipe")
    return recipe if isinstance(recipe, dict) else None


def settings_of(recipe: dict | None, summary: Summary | None, config: dict | None) -> tuple[dict, dict[int, int | None]]:
    """A run's settings (teacher, target, ``target_args.*``, the stages' steps and stage-2 settings) and the tokens
    each stage trained."""
    recipe = recipe or {}
    edit = (config or {}).get("edit") or {}
    out = {
        "teacher": recipe.get("teacher") or (summary and summary.teacher),
        "target": recipe.get("target") or (summary and summary.target) or edit.get("target"),
    }
    target_args = recipe.get("target_args") or edit.get("settings") or {}
    out.update({f"target_args.{k}": v for k, v in target_args.items()})
    for name in STAGE_SETTINGS:
        section, key = name.split(".")
        out[name] = (recipe.get(section) or {}).get(key)
    if out["stage2.seq_len"] is None:  # the recipe's default: data.seq_len
        out["stage2.seq_len"] = (recipe.get("data") or {}).get("seq_len")
    tokens = {}
    for stage in (1, 2):
        info = summary.stage(stage) if summary else None
        if info:
            out[f"stage{stage}.steps"] = info.steps
        # a stage of 0 steps is skipped and leaves no entry in summary.json: it trained on 0 tokens
        tokens[stage] = info.tokens if info else (0 if out[f"stage{stage}.steps"] == 0 else None)
    return out, tokens


def zero_shot_metric(figures: dict | None) -> str | None:
    """The accuracy a comparison uses for a few-shot task: ``acc_norm`` where reported, else ``acc``."""
    figures = figures or {}
    return next((m for m in ("acc_norm", "acc") if figures.get(m) is not None), None)


def is_perplexity(task: str) -> bool:
    return task == PPL_TASK or task.startswith(f"{PPL_TASK}@")


def quality_figures(quality: Quality) -> tuple[Figures, Figures]:
    """The student's and the teacher's perplexity per window and zero-shot accuracy per few-shot task;
    ``wikitext2`` without ``@N`` is the window of ``perplexity.max_length``."""
    student, teacher = Figures(), Figures()
    window = quality.perplexity.max_length if quality.perplexity else None
    for task, t in quality.tasks.items():
        s, te = t.student or {}, t.teacher or {}
        if is_perplexity(task):
            n = int(task.split("@", 1)[1]) if "@" in task else window
            for figures, values in ((student, s), (teacher, te)):
                if values.get("ppl") is not None:
                    figures.ppl[int(n) if n else None] = values["ppl"]
            continue
        metric = zero_shot_metric(s) or zero_shot_metric(te)
        if metric is None:
            continue
        for figures, values in ((student, s), (teacher, te)):
            if values.get(metric) is not None:
                figures.accuracy[task] = Accuracy(values[metric], values.get(f"{metric}_stderr"), metric)
    return student, teacher


def passkey_means(passkey: Passkey, name: str) -> dict[int, float]:
    """``name``'s passkey accuracy per context, the mean over depths."""
    return {c: sum(row.values()) / len(row) for c, row in passkey.grid(name).items()}


def stopped_quality(run: Path) -> tuple[Quality | None, int]:
    """The pieces an evaluation finished before it was stopped (``eval.progress.json``, which it resumes from) as
    an ``eval.json`` record, and how many there are; (None, 0) without such a file."""
    path = progress_path(Quality.path(run))
    if not path.is_file():
        return None, 0
    with _layout(path):
        key, pieces = read_kept(path)
        key = key or {}
        student, teacher = pieces.get("student") or {}, pieces.get("teacher") or {}
        contexts = key.get("ppl_context") or []
        record = {
            "model": key.get("model"),
            "teacher": key.get("teacher"),
            "tasks": {name: {"student": student.get(name), "teacher": teacher.get(name)} for name in dict.fromkeys([*student, *teacher])},
            "perplexity": {"max_length": contexts[0]} if len(contexts) == 1 else None,  # one window: named wikitext2
        }
    return Quality.parse(record, path), len(student) + len(teacher)


def stopped_training(run: Path, settings: dict[str, Any]) -> str | None:
    """Where a run that wrote no ``summary.json`` stopped training, from the last step ``metrics.jsonl`` logged and the
    recipe's steps (``stage 2, step 1,500 of 3,000``), and whether it kept a checkpoint to resume from; None when it
    logged no step."""
    with _layout(run / "metrics.jsonl"):
        records = read_metrics(run / "metrics.jsonl") or []
        last = next((r for r in reversed(records) if isinstance(r.get("step"), int)), None)
    if last is None:
        return None
    stage = last["stage"].removeprefix("stage")
    total = settings.get(f"stage{stage}.steps")
    where = f"stage {stage}, step {last['step']:,}" + (f" of {total:,}" if isinstance(total, int) else "")
    kept = list_checkpoints(run) or list_checkpoints(run, ".dcp")
    then = f"`attnedit convert {run} --resume` continues it" if kept else f"the folder keeps no checkpoint ({CHECKPOINT_DIR}/)"
    return f"its training stopped after {where} (the last step metrics.jsonl logged); {then}"


def run_figures(run_dir: str | Path) -> RunFigures:
    """One run folder's figures (see :class:`RunFigures`); ``missing`` lists the files of :data:`FILES` it lacks."""
    run = check_run_dir(run_dir)
    config = read_model_config(run)
    summary, quality = Summary.read(run), Quality.read(run)
    stopped = 0
    if quality is None:
        quality, stopped = stopped_quality(run)
    bench, passkey = Bench.read(run), Passkey.read(run)
    recipe = read_recipe(run)
    fig = RunFigures(run=run.resolve().name, path=str(run), stopped_pieces=stopped)
    where = run / ("recipe.yaml" if (run / "recipe.yaml").is_file() else "model/attnedit.json")
    with _layout(*([where] if recipe else []), Summary.path(run)):
        fig.settings, fig.tokens = settings_of(recipe, summary, config)
    fig.heldout_kl = summary.heldout_after.kl if summary and summary.heldout_after else None
    fig.stages = summary.trained_stages() if summary else {}
    fig.stopped_training = None if summary else stopped_training(run, fig.settings)
    series = kv_series(summary, bench)
    if series is not None:
        _, contexts, student, teacher = series
        with _layout(Summary.path(run) if summary and summary.kv and summary.kv.student else Bench.path(run)):
            i = max(range(len(contexts)), key=lambda j: contexts[j])
            fig.kv_context, fig.kv_percent = contexts[i], 100 * student[i] / teacher[i]
    if quality:
        fig.student, fig.teacher = quality_figures(quality)
    if passkey:
        fig.passkey = passkey
        fig.student.passkey, fig.teacher.passkey = passkey_means(passkey, "student"), passkey_means(passkey, "teacher")
    fig.teacher_model = teacher_name(summary, quality, bench, passkey) or fig.settings.get("teacher")
    has = {"recipe.yaml": recipe is not None, Quality.FILE: fig.stopped_pieces > 0}
    fig.missing = [name for name in FILES if not (run / name).is_file() and not has.get(name)]
    return fig


# ------------------------------------------------------------------------------------ across the runs


def teacher_row(runs: list[RunFigures]) -> RunFigures:
    """The teacher's figures, each from the first run that has it, in the row's ``student`` place; its KV is
    100% and its KL 0. For runs of one teacher (:func:`teacher_rows` groups them)."""
    row = RunFigures(run="teacher", path="")
    for r in runs:
        for mine, theirs in ((row.student.ppl, r.teacher.ppl), (row.student.accuracy, r.teacher.accuracy), (row.student.passkey, r.teacher.passkey)):
            for k, v in theirs.items():
                if k not in mine:
                    mine[k] = v
                    row.teacher_model = row.teacher_model or r.teacher_model
    row.kv_percent = 100.0 if any(r.kv_percent is not None for r in runs) else None
    row.heldout_kl = 0.0 if any(r.heldout_kl is not None for r in runs) else None
    row.teacher_model = row.teacher_model or next((r.teacher_model for r in runs if r.teacher_model), None)
    return row


def teacher_label(name: str | None) -> str:
    """A teacher as the tables name it: its name or Hugging Face id; a local file or folder by its own name, so one
    GGUF kept in different folders on different machines is one teacher."""
    if not name:
        return ""
    return Path(name).name if name.startswith(("/", "~", ".")) or name.endswith(".gguf") or Path(name).exists() else name


def teacher_groups(runs: list[RunFigures]) -> list[str]:
    """Each run's teacher label (:func:`teacher_label`); a run whose files name none joins the first teacher."""
    labels = [teacher_label(r.teacher_model) for r in runs]
    first = next((x for x in labels if x), "")
    return [x or first for x in labels]


def teacher_rows(runs: list[RunFigures]) -> dict[str, RunFigures]:
    """One teacher row (:func:`teacher_row`) per teacher the runs were measured against, in order of appearance,
    keyed by its label: runs of several teachers compare each run with its own teacher."""
    groups = teacher_groups(runs)
    return {g: teacher_row([r for r, h in zip(runs, groups) if h == g]) for g in dict.fromkeys(groups)}


def own_teacher(runs: list[RunFigures], teachers: dict[str, RunFigures]) -> list[RunFigures]:
    """The teacher row each run is compared with."""
    return [teachers[g] for g in teacher_groups(runs)]


def reference(run: RunFigures, kind: str, key, teacher: RunFigures):
    """The teacher's figure ``key`` of ``kind`` (ppl, accuracy, passkey) for ``run``: from the run's own files,
    else from the teacher row."""
    own = getattr(run.teacher, kind).get(key)
    return own if own is not None else getattr(teacher.student, kind).get(key)


def setting_keys(runs: list[RunFigures]) -> list[str]:
    """Every setting a run may differ in: the teacher, ``target_args.*`` (in order of appearance), the stages'."""
    target_args = [k for r in runs for k in r.settings if k.startswith("target_args.")]
    return ["teacher", *dict.fromkeys(target_args), *STAGE_SETTINGS]


def _same(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def varying(runs: list[RunFigures], keys: list[str]) -> list[str]:
    """The settings whose values (absent = None) are not the same in every run."""
    return [k for k in keys if len({_same(r.settings.get(k)) for r in runs}) > 1]


def windows(runs: list[RunFigures]) -> list[int | None]:
    """The perplexity windows of any run: an unrecorded one first, then by length."""
    found = dict.fromkeys(w for r in runs for w in r.student.ppl)
    return sorted(found, key=lambda w: -1 if w is None else w)


def passkey_contexts(runs: list[RunFigures]) -> list[int]:
    return sorted(dict.fromkeys(c for r in runs for c in r.student.passkey))


def tasks_of(runs: list[RunFigures]) -> list[str]:
    """Every few-shot task any run (or the teacher) has, in order of appearance."""
    return list(dict.fromkeys(t for r in runs for t in (*r.student.accuracy, *r.teacher.accuracy)))


def mean_accuracy(run: RunFigures, teacher: RunFigures, tasks: list[str]) -> tuple[float | None, float | None, int]:
    """(mean accuracy over the run's tasks among ``tasks``, the teacher's mean over the same tasks or None
    where it lacks one, how many tasks)."""
    mine = [t for t in tasks if t in run.student.accuracy]
    if not mine:
        return None, None, 0
    refs = [reference(run, "accuracy", t, teacher) for t in mine]
    ref = None if any(a is None for a in refs) else sum(a.value for a in refs) / len(refs)
    return sum(run.student.accuracy[t].value for t in mine) / len(mine), ref, len(mine)


# -------------------------------------------------------------------------------------------- cells


def num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"


def setting_cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def ppl_cell(run: RunFigures, window: int | None, teacher: RunFigures) -> str:
    v = run.student.ppl.get(window)
    if v is None:
        return "-"
    ref = reference(run, "ppl", window, teacher)
    if ref is None or not ref or not math.isfinite(v):
        return num(v)
    return f"{num(v)} ({100 * (v / ref - 1):+.1f}%)"


def zero_shot_cell(run: RunFigures, teacher: RunFigures, tasks: list[str]) -> str:
    mean, ref, n = mean_accuracy(run, teacher, tasks)
    if mean is None:
        return "-"
    text = f"{100 * mean:.1f}" + ("" if ref is None else f" ({100 * (mean - ref):+.1f})")
    return text if n == len(tasks) else f"{text} [{n} of {len(tasks)} tasks]"


def accuracy_cell(a: Accuracy | None) -> str:
    if a is None:
        return "-"
    return f"{100 * a.value:.1f}" if a.stderr is None else f"{100 * a.value:.1f} ± {100 * a.stderr:.1f}"


def _label(key: str) -> str:
    return key.removeprefix("target_args.")


# ------------------------------------------------------------------------------------------- tables


HELD_HEADER = f"passkey cells within {PASSKEY_POINTS} pts"


def has_held_column(runs: list[RunFigures]) -> bool:
    """Whether the runs table counts the passkey cells held: some run has a passkey grid with its teacher's."""
    return any(passkey_cells_held(r.passkey) for r in runs)


def held_cell(run: RunFigures, is_teacher: bool) -> str:
    held = None if is_teacher else passkey_cells_held(run.passkey)
    return "-" if held is None else f"{held[0]} of {held[1]}"


def runs_table(runs: list[RunFigures], teachers: dict[str, RunFigures]) -> str:
    """Part 1: a row per run, then each teacher's (see the module docstring for the columns)."""
    settings = varying(runs, setting_keys(runs))
    held_column = has_held_column(runs)
    rows_of_teachers = list(teachers.values())
    ppls, contexts, tasks = windows(runs + rows_of_teachers), passkey_contexts(runs + rows_of_teachers), tasks_of(runs + rows_of_teachers)
    kv_contexts = {r.kv_context for r in runs if r.kv_context is not None}
    one_context = len(kv_contexts) == 1
    kv_header = f"KV % of T @{next(iter(kv_contexts)):,}" if one_context else "KV % of T @context"
    headers = (
        ["run", "target", *(_label(k) for k in settings), "stage1 tokens", "stage2 tokens", kv_header, "held-out KL"]
        + ["ppl (Δ%)" if w is None else f"ppl @{w} (Δ%)" for w in ppls]
        + ["zero-shot acc % (Δ pts)"]
        + [f"passkey @{c}" for c in contexts]
        + ([HELD_HEADER] if held_column else [])
    )

    def kv_cell(r):
        if r.kv_percent is None:
            return "-"
        return f"{r.kv_percent:.1f}%" + ("" if one_context or r.kv_context is None else f" @{r.kv_context:,}")

    def row(r, ref, is_teacher=False):
        label = f"teacher ({teacher_label(r.teacher_model)})" if is_teacher and r.teacher_model else r.run
        return (
            [label, "-" if is_teacher else setting_cell(r.settings.get("target"))]
            + ["-" if is_teacher else setting_cell(r.settings.get(k)) for k in settings]
            + ["-" if is_teacher else tokens_cell(r.tokens.get(s)) for s in (1, 2)]
            + [kv_cell(r), "-" if r.heldout_kl is None else f"{r.heldout_kl:.4g}"]
            + [ppl_cell(r, w, ref) for w in ppls]
            + [zero_shot_cell(r, ref, tasks)]
            + ["-" if r.student.passkey.get(c) is None else f"{r.student.passkey[c]:.2f}" for c in contexts]
            + ([held_cell(r, is_teacher)] if held_column else [])
        )

    rows = [row(r, ref) for r, ref in zip(runs, own_teacher(runs, teachers))]
    rows += [row(t, RunFigures(run="", path=""), is_teacher=True) for t in rows_of_teachers]
    return markdown_table(headers, rows)


def training_table(runs: list[RunFigures]) -> str | None:
    """Part 2: a row per run and stage that trained (:func:`~attnedit.report.build.stage_table`)."""
    return stage_table([(r.run, r.stages) for r in runs])


def notes(runs: list[RunFigures], teachers: dict[str, RunFigures]) -> list[str]:
    """Missing files per run, and runs whose own teacher figures are not their teacher row's."""
    out = [f"- {r.run}: no {', '.join(r.missing)}" for r in runs if r.missing]
    out += [
        f"- {r.run}: its evaluation was stopped before it wrote eval.json; its quality figures are the {r.stopped_pieces} "
        f"pieces it finished (eval.progress.json; resuming the run completes it)"
        for r in runs if r.stopped_pieces
    ]  # fmt: skip
    out += [f"- {r.run}: {r.stopped_training}" for r in runs if r.stopped_training]
    for r, teacher in zip(runs, own_teacher(runs, teachers)):
        row = teacher.student.labelled()
        differ = [
            k for k, v in r.teacher.labelled().items()
            if isinstance(row.get(k), (int, float)) and not math.isclose(v, row[k], rel_tol=1e-6, abs_tol=1e-12)
        ]  # fmt: skip
        if differ:
            out.append(
                f"- {r.run}: its own teacher figures differ from the teacher row's ({', '.join(differ[:4])}"
                f"{', ...' if len(differ) > 4 else ''}: other eval settings?); its changes are against its own"
            )
    return out


def zero_shot_table(runs: list[RunFigures], teachers: dict[str, RunFigures]) -> str | None:
    """Part 2: rows the few-shot tasks (and their mean), columns each teacher and each run; accuracy in %."""
    rows_of_teachers = list(teachers.values())
    tasks = tasks_of(runs + rows_of_teachers)
    if not tasks:
        return None

    def metric(task):
        found = (a.metric for r in runs for a in (r.student.accuracy.get(task), r.teacher.accuracy.get(task)) if a)
        return next(found, "-")

    columns = rows_of_teachers + runs
    rows = [[t, metric(t)] + [accuracy_cell(r.student.accuracy.get(t)) for r in columns] for t in tasks]

    def mean(r):
        m, _, n = mean_accuracy(r, RunFigures(run="", path=""), tasks)
        return "-" if m is None else f"{100 * m:.1f}" + ("" if n == len(tasks) else f" [{n} of {len(tasks)}]")

    rows.append(["mean", ""] + [mean(r) for r in columns])
    names = ["teacher"] if len(teachers) == 1 else [f"teacher ({g})" for g in teachers]
    return markdown_table(["task", "metric", *names] + [r.run for r in runs], rows)


def teacher_grid(passkey: Passkey) -> Passkey:
    """A run's passkey record with the teacher's accuracies in the student's place (how its keys were drawn kept)."""
    return passkey.model_copy(update={"student": passkey.teacher, "teacher": None})


def passkey_grid_table(runs: list[RunFigures]) -> str | None:
    """Part 3: one table, a row per (model, context), a column per depth (the union of the runs' depths); a teacher
    row for each teacher and way the runs drew their keys (5 on one filler, 20 each with its own...), from the first
    run that did."""
    grids: dict[tuple[str, str], Passkey] = {}
    for r, g in zip(runs, teacher_groups(runs)):
        if r.passkey is not None and r.passkey.teacher is not None:
            grids.setdefault((g, passkey_protocol(r.passkey)), teacher_grid(r.passkey))
    several = len({g for g, _ in grids}) > 1
    models = [(f"teacher ({g})" if several else "teacher", pk) for (g, _), pk in grids.items()]
    models += [(r.run, r.passkey) for r in runs if r.passkey is not None]
    if not models:
        return None
    depths = sorted({d for _, pk in models for d in pk.depths})
    rows = []
    for name, pk in models:
        for c, by_depth in pk.grid("student").items():
            rows.append([name, c, passkey_protocol(pk)] + [f"{by_depth[d]:.2f}" if d in by_depth else "-" for d in depths])
    return markdown_table(["model", "context", "keys"] + [f"depth {d:g}" for d in depths], rows)


def render_comparison(runs: list[RunFigures]) -> str:
    """The comparison document for runs' figures (:func:`run_figures`), teacher row included."""
    names = [r.run for r in runs]
    if len(set(names)) < len(names):  # two folders of one name: tell them apart by their paths
        runs = [dataclasses.replace(r, run=r.path) for r in runs]
    teachers = teacher_rows(runs)
    lines = [f"# attnedit comparison: {len(runs)} run{'s' * (len(runs) != 1)}", ""]
    lines += ["Runs: " + ", ".join(f"`{r.run}` ({r.path})" for r in runs) + ".", ""]
    lines += [
        "## Runs",
        "",
        "- settings: only those that differ between the runs (recipe.yaml), besides target and each stage's tokens;",
        "- KV % of T: the KV cache's bytes per token as % of the teacher's, at the largest context of the run's KV figures (summary.json, else bench.json);",
        "- held-out KL: KL(teacher || student) on the held-out blocks after stage 2 (summary.json);",
        "- ppl @N (Δ%): WikiText-2 perplexity with an N-token window, and its change vs the teacher in %;",
        f"- zero-shot acc %: mean over the run's few-shot tasks of {ZERO_SHOT_RULE}; in brackets the difference "
        "from the teacher's mean over the same tasks, in points; [k of n tasks] where a run has only some of them;",
        "- passkey @C: passkey retrieval accuracy at context C, mean over depths (0..1 = share of trials);",
        *(
            [
                f"- passkey cells within {PASSKEY_POINTS} pts: the (context, depth) cells where the student retrieves at most "
                f"{PASSKEY_POINTS} points less often than the teacher on the same keys (passkey.json), of all cells;"
            ]
            if has_held_column(runs)
            else []
        ),
        "- changes are against the teacher figures in the run's own files (else its teacher's row); a teacher's row "
        "takes each figure from the first of its runs that has it (one row per teacher where the runs convert several); "
        "'-': the run folder lacks that input.",
        "",
        runs_table(runs, teachers),
    ]
    extra = notes(runs, teachers)
    if extra:
        lines += ["", *extra]
    table = training_table(runs)
    if table:
        lines += ["", "## Training: speed and memory", "", *TRAINING_RULES, "", table]
    lines += ["", "## Zero-shot accuracy per task", ""]
    table = zero_shot_table(runs, teachers)
    if table:
        lines += [f"Accuracy in % ± stderr: {ZERO_SHOT_RULE}.", "", table]
    else:
        lines += ["_No few-shot tasks in these runs' eval.json (attnedit eval MODEL --teacher T --tasks arc_easy,piqa ...)._"]
    lines += ["", "## Passkey retrieval", ""]
    table = passkey_grid_table(runs)
    if table:
        lines += ["Accuracy per (context, depth); depth 0 puts the key at the start of the filler, 1 right before the question.", "", table]
        absent = [r.run for r in runs if r.passkey is None]
        if absent:
            lines += ["", f"No passkey.json: {', '.join(absent)}."]
    else:
        lines += ["_No passkey.json in these runs (attnedit passkey MODEL --teacher T --save RUN/passkey.json)._"]
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Read each run folder's figures and write the comparison to ``out``; return its path."""
    out = Path(out)
    if out.is_dir():
        raise AttnEditError(f"--out {out} is a folder; give the comparison's file name, e.g. {out / 'compare.md'}")
    if not run_dirs:
        raise AttnEditError("no run folders to compare; give one or more folders written by attnedit convert")
    runs = [run_figures(r) for r in run_dirs]
    return write_text(out, render_comparison(runs))
