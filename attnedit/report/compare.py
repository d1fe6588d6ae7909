"""Several run folders side by side (``attnedit report RUN RUN ... --out FILE.md``): one row per run, for
ablation tables.

The Markdown file has three parts:

1. **Runs**: one row per run and one for the teacher. The run's name (its folder's), its target, the
   settings that differ between the runs (``target_args`` such as ``window``/``sink``/``full_layers``/
   ``gate``/``kv_lora_rank``/``init``, the stages' steps, stage 2's sequence length, ``trainable``,
   ``feature_weight``, ...: only the columns whose values differ), the tokens of each stage (always), the KV
   cache as % of the teacher's at the largest context of the run's KV figures, the held-out KL after
   stage 2, WikiText-2 perplexity per window with its change vs the teacher in %, the mean zero-shot
   accuracy with its difference vs the teacher in points, and passkey accuracy per context (mean over
   depths).
2. **Zero-shot accuracy per task**: rows tasks, columns the teacher and each run.
3. **Passkey retrieval**: each run's grid (context x depth), the teacher's first.

Rules, also written into the file:

* zero-shot accuracy is ``acc_norm`` where the task reports it, else ``acc`` (lm-evaluation-harness
  reports both for arc_easy, arc_challenge, hellaswag and piqa, only ``acc`` for winogrande; ``report.md``
  lists both). A run's mean is over the few-shot tasks of its ``eval.json``.
* a run's changes vs the teacher are against the teacher figures in the run's own files (same data, same
  settings); where a run has none, against the teacher row. The teacher row takes each figure from the
  first run that has it; a run whose teacher figures differ from the row's gets a note.
* ``-``: the run folder lacks that input (the notes under the table say which files are missing).

Every figure comes from the run folders' files, read with the single-run report's readers
(:mod:`attnedit.report.build`): ``summary.json`` (tokens, held-out KL, KV figures; ``bench.json``'s KV when
the summary has none), ``eval.json``, ``passkey.json``, and the settings from ``recipe.yaml`` (else the
recipe in ``model/attnedit.json``, else the edit settings in ``model/config.json``). No model is loaded.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import yaml

from ..errors import AttnEditError
from ..eval.quality import PPL_TASK
from ..io import write_text
from ..tables import markdown_table
from .build import check_run_dir, kv_series, passkey_protocol, read_json, read_model_config, teacher_name

T = "teacher:"  # prefix of the teacher's figures as a run's own files record them
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
FILES = ("recipe.yaml", "summary.json", "eval.json", "passkey.json")


# -------------------------------------------------------------------------------------- one run's figures


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
                f"{path} is not valid YAML ({first}); put back the recipe.yaml attnedit convert wrote "
                "(its sha256 is in recipe.yaml.sha256)"
            ) from None
        if not isinstance(raw, dict):
            raise AttnEditError(f"{path} is not a recipe (a YAML mapping); put back the recipe.yaml attnedit convert wrote")
        return raw
    provenance = read_json(run / "model" / "attnedit.json")
    recipe = (provenance or {}).get("recipe")
    return recipe if isinstance(recipe, dict) else None


def settings_of(recipe: dict | None, summary: dict | None, config: dict | None) -> dict:
    """target, teacher, ``target_args.*``, the stages' steps and tokens and the stage-2 settings of a run."""
    recipe, summary = recipe or {}, summary or {}
    edit = (config or {}).get("edit") or {}
    out = {
        "teacher": recipe.get("teacher") or summary.get("teacher"),
        "target": recipe.get("target") or summary.get("target") or edit.get("target"),
    }
    target_args = recipe.get("target_args") or edit.get("settings") or {}
    out.update({f"target_args.{k}": v for k, v in target_args.items()})
    for name in STAGE_SETTINGS:
        section, key = name.split(".")
        out[name] = (recipe.get(section) or {}).get(key)
    if out["stage2.seq_len"] is None:  # the recipe's default: data.seq_len
        out["stage2.seq_len"] = (recipe.get("data") or {}).get("seq_len")
    for stage in (1, 2):
        info = summary.get(f"stage{stage}")
        if info:
            out[f"stage{stage}.steps"] = info.get("steps", out[f"stage{stage}.steps"])
        # a stage of 0 steps is skipped and leaves no entry in summary.json: it trained on 0 tokens
        out[f"stage{stage}.tokens"] = info.get("tokens") if info else (0 if out[f"stage{stage}.steps"] == 0 else None)
    return out


def zero_shot_metric(figures: dict | None) -> str | None:
    """The accuracy a comparison uses for a few-shot task: ``acc_norm`` where reported, else ``acc``."""
    figures = figures or {}
    return next((m for m in ("acc_norm", "acc") if figures.get(m) is not None), None)


def is_perplexity(task: str) -> bool:
    return task == PPL_TASK or task.startswith(f"{PPL_TASK}@")


def eval_figures(eval_json: dict) -> dict:
    """``ppl@N`` per perplexity window and ``zs:TASK`` (with ``:stderr``, ``:metric``) per few-shot task, the
    teacher's as ``teacher:...``; ``wikitext2`` without ``@N`` is the window of ``perplexity.max_length``."""
    out: dict = {}
    window = (eval_json.get("perplexity") or {}).get("max_length")
    for task, t in eval_json["tasks"].items():
        student, teacher = t.get("student") or {}, t.get("teacher") or {}
        if is_perplexity(task):
            n = int(task.split("@", 1)[1]) if "@" in task else window
            key = f"ppl@{int(n)}" if n else "ppl"
            out[key], out[T + key] = student.get("ppl"), teacher.get("ppl")
            continue
        metric = zero_shot_metric(student) or zero_shot_metric(teacher)
        if metric is None:
            continue
        key = f"zs:{task}"
        out[key], out[f"{key}:stderr"], out[f"{key}:metric"] = student.get(metric), student.get(f"{metric}_stderr"), metric
        out[T + key], out[f"{T}{key}:stderr"] = teacher.get(metric), teacher.get(f"{metric}_stderr")
    return out


def passkey_figures(passkey: dict) -> dict:
    """``passkey@C`` (mean over depths) per context, the teacher's as ``teacher:passkey@C``, and the grids."""
    contexts, depths = list(passkey["contexts"]), [float(d) for d in passkey["depths"]]
    grids = {"contexts": contexts, "depths": depths, "trials": passkey["trials"], "filler": passkey.get("filler", "same")}
    out: dict = {}
    for name, prefix in (("student", ""), ("teacher", T)):
        grid = passkey.get(name)
        if grid is None:
            continue
        if len(grid) != len(contexts) or any(len(row) != len(depths) for row in grid):
            raise ValueError(f"the {name} grid is not one row of {len(depths)} depths per context")
        grids[name] = grid
        for c, accs in zip(contexts, grid):
            out[f"{prefix}passkey@{int(c)}"] = sum(accs) / len(accs)
    out["passkey"] = grids
    return out


def run_figures(run_dir: str | Path) -> dict:
    """One run folder's figures as a flat dict (absent figures are absent keys): ``run``, the settings
    (:func:`settings_of`), ``kv.percent`` and ``kv.context``, ``heldout_kl``, :func:`eval_figures`,
    :func:`passkey_figures`, ``teacher_model`` and ``missing`` (the files of :data:`FILES` it lacks)."""
    run = check_run_dir(run_dir)
    config = read_model_config(run)
    summary, eval_json = read_json(run / "summary.json"), read_json(run / "eval.json")
    bench, passkey = read_json(run / "bench.json"), read_json(run / "passkey.json")
    recipe = read_recipe(run)
    fig: dict = {"run": run.resolve().name, "path": str(run)}
    where = run / ("recipe.yaml" if (run / "recipe.yaml").is_file() else "model/attnedit.json")
    with _layout(*([where] if recipe else []), run / "summary.json"):
        fig.update(settings_of(recipe, summary, config))
    with _layout(run / "summary.json"):
        after = (summary or {}).get("heldout_after") or {}
        fig["heldout_kl"] = after.get("kl")
    source = "summary.json" if (((summary or {}).get("kv") or {}).get("student")) else "bench.json"
    with _layout(run / source):
        series = kv_series(summary, bench)
        if series is not None:
            _, contexts, student, teacher = series
            i = max(range(len(contexts)), key=lambda j: contexts[j])
            fig["kv.context"], fig["kv.percent"] = contexts[i], 100 * student[i] / teacher[i]
    if eval_json:
        with _layout(run / "eval.json"):
            fig.update(eval_figures(eval_json))
    if passkey:
        with _layout(run / "passkey.json"):
            fig.update(passkey_figures(passkey))
    fig["teacher_model"] = teacher_name(summary, eval_json, bench, passkey) or fig.get("teacher")
    fig["missing"] = [name for name in FILES if not (run / name).is_file() and not (name == "recipe.yaml" and recipe)]
    return {k: v for k, v in fig.items() if v is not None}


# ------------------------------------------------------------------------------------ across the runs


def teacher_row(runs: list[dict]) -> dict:
    """The teacher's figures, each from the first run that has it; its KV is 100% and its KL 0."""
    row: dict = {"run": "teacher"}
    for r in runs:
        for k, v in r.items():
            if k.startswith(T) and k[len(T) :] not in row:
                row[k[len(T) :]] = v
                row["teacher_model"] = row.get("teacher_model") or r.get("teacher_model")
    if any("kv.percent" in r for r in runs):
        row["kv.percent"] = 100.0
    if any("heldout_kl" in r for r in runs):
        row["heldout_kl"] = 0.0
    row["teacher_model"] = row.get("teacher_model") or next((r["teacher_model"] for r in runs if "teacher_model" in r), None)
    return {k: v for k, v in row.items() if v is not None}


def reference(run: dict, key: str, teacher: dict):
    """The teacher's ``key`` for ``run``: from the run's own files, else from the teacher row."""
    own = run.get(T + key)
    return own if own is not None else teacher.get(key)


def setting_keys(runs: list[dict]) -> list[str]:
    """Every setting a run may differ in: the teacher, ``target_args.*`` (in order of appearance), the stages'."""
    target_args = [k for r in runs for k in r if k.startswith("target_args.")]
    return ["teacher", *dict.fromkeys(target_args), *STAGE_SETTINGS]


def _same(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def varying(runs: list[dict], keys: list[str]) -> list[str]:
    """The keys whose values (absent = None) are not the same in every run."""
    return [k for k in keys if len({_same(r.get(k)) for r in runs}) > 1]


def _keys(runs: list[dict], prefix: str) -> list[str]:
    """Keys starting with ``prefix`` in any run, in order of appearance, without ``:stderr``/``:metric`` ones."""
    return list(dict.fromkeys(k for r in runs for k in r if k.startswith(prefix) and k.count(":") <= 1))


def ppl_keys(runs: list[dict]) -> list[str]:
    """``ppl`` (window unknown) then ``ppl@N`` by window."""
    keys = _keys(runs, "ppl")
    return sorted(keys, key=lambda k: int(k.split("@")[1]) if "@" in k else -1)


def passkey_keys(runs: list[dict]) -> list[str]:
    return sorted(_keys(runs, "passkey@"), key=lambda k: int(k.split("@")[1]))


def task_keys(runs: list[dict]) -> list[str]:
    """``zs:TASK`` of every few-shot task any run (or the teacher) has, in order of appearance."""
    return _keys(runs, "zs:")


def mean_accuracy(run: dict, teacher: dict, tasks: list[str]) -> tuple[float | None, float | None, int]:
    """(mean accuracy over the run's tasks among ``tasks``, the teacher's mean over the same tasks or None
    where it lacks one, how many tasks)."""
    mine = [k for k in tasks if run.get(k) is not None]
    if not mine:
        return None, None, 0
    refs = [reference(run, k, teacher) for k in mine]
    ref = None if any(v is None for v in refs) else sum(refs) / len(refs)
    return sum(run[k] for k in mine) / len(mine), ref, len(mine)


# -------------------------------------------------------------------------------------------- cells


def num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"


def tokens_cell(n) -> str:
    if n is None:
        return "-"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def setting_cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def ppl_cell(run: dict, key: str, teacher: dict) -> str:
    v = run.get(key)
    if v is None:
        return "-"
    ref = reference(run, key, teacher)
    if ref is None or not ref or not math.isfinite(v):
        return num(v)
    return f"{num(v)} ({100 * (v / ref - 1):+.1f}%)"


def zero_shot_cell(run: dict, teacher: dict, tasks: list[str]) -> str:
    mean, ref, n = mean_accuracy(run, teacher, tasks)
    if mean is None:
        return "-"
    text = f"{100 * mean:.1f}" + ("" if ref is None else f" ({100 * (mean - ref):+.1f})")
    return text if n == len(tasks) else f"{text} [{n} of {len(tasks)} tasks]"


def accuracy_cell(run: dict, key: str) -> str:
    v, err = run.get(key), run.get(f"{key}:stderr")
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if err is None else f"{100 * v:.1f} ± {100 * err:.1f}"


def _label(key: str) -> str:
    return key.removeprefix("target_args.")


# ------------------------------------------------------------------------------------------- tables


def runs_table(runs: list[dict], teacher: dict) -> str:
    """Part 1: a row per run, then the teacher's (see the module docstring for the columns)."""
    settings = varying(runs, setting_keys(runs))
    ppls, passkeys, tasks = ppl_keys(runs + [teacher]), passkey_keys(runs + [teacher]), task_keys(runs + [teacher])
    kv_contexts = {r["kv.context"] for r in runs if "kv.context" in r}
    one_context = len(kv_contexts) == 1
    kv_header = f"KV % of T @{next(iter(kv_contexts)):,}" if one_context else "KV % of T @context"
    headers = (
        ["run", "target", *(_label(k) for k in settings), "stage1 tokens", "stage2 tokens", kv_header, "held-out KL"]
        + [f"ppl @{k.split('@')[1]} (Δ%)" if "@" in k else "ppl (Δ%)" for k in ppls]
        + ["zero-shot acc % (Δ pts)"]
        + [f"passkey @{k.split('@')[1]}" for k in passkeys]
    )

    def kv_cell(r):
        if "kv.percent" not in r:
            return "-"
        return f"{r['kv.percent']:.1f}%" + ("" if one_context or "kv.context" not in r else f" @{r['kv.context']:,}")

    def row(r, ref, is_teacher=False):
        label = f"teacher ({r['teacher_model']})" if is_teacher and r.get("teacher_model") else r["run"]
        return (
            [label, "-" if is_teacher else setting_cell(r.get("target"))]
            + ["-" if is_teacher else setting_cell(r.get(k)) for k in settings]
            + ["-" if is_teacher else tokens_cell(r.get(f"stage{s}.tokens")) for s in (1, 2)]
            + [kv_cell(r), "-" if r.get("heldout_kl") is None else f"{r['heldout_kl']:.4g}"]
            + [ppl_cell(r, k, ref) for k in ppls]
            + [zero_shot_cell(r, ref, tasks)]
            + ["-" if r.get(k) is None else f"{r[k]:.2f}" for k in passkeys]
        )

    rows = [row(r, teacher) for r in runs] + [row(teacher, {}, is_teacher=True)]
    return markdown_table(headers, rows)


def notes(runs: list[dict], teacher: dict) -> list[str]:
    """Missing files per run, and runs whose own teacher figures are not the teacher row's."""
    out = [f"- {r['run']}: no {', '.join(r['missing'])}" for r in runs if r.get("missing")]
    for r in runs:
        differ = [
            k[len(T) :]
            for k, v in r.items()
            if k.startswith(T) and not k.endswith(":stderr") and isinstance(v, (int, float)) and isinstance(teacher.get(k[len(T) :]), (int, float))
            and not math.isclose(v, teacher[k[len(T) :]], rel_tol=1e-6, abs_tol=1e-12)
        ]  # fmt: skip
        if differ:
            out.append(
                f"- {r['run']}: its own teacher figures differ from the teacher row's ({', '.join(differ[:4])}"
                f"{', ...' if len(differ) > 4 else ''}: other eval settings?); its changes are against its own"
            )
    return out


def zero_shot_table(runs: list[dict], teacher: dict) -> str | None:
    """Part 2: rows the few-shot tasks (and their mean), columns the teacher and each run; accuracy in %."""
    tasks = task_keys(runs + [teacher])
    if not tasks:
        return None
    metric = {k: next((r[f"{k}:metric"] for r in runs if f"{k}:metric" in r), "-") for k in tasks}
    rows = [[k.removeprefix("zs:"), metric[k], accuracy_cell(teacher, k)] + [accuracy_cell(r, k) for r in runs] for k in tasks]

    def mean(r):
        m, _, n = mean_accuracy(r, {}, tasks)
        return "-" if m is None else f"{100 * m:.1f}" + ("" if n == len(tasks) else f" [{n} of {len(tasks)}]")

    rows.append(["mean", "", mean(teacher)] + [mean(r) for r in runs])
    return markdown_table(["task", "metric", "teacher"] + [r["run"] for r in runs], rows)


def teacher_grid(passkey: dict) -> dict:
    """A run's passkey.json with the teacher's accuracies in the student's place (how its keys were drawn kept)."""
    return {**{k: passkey[k] for k in ("contexts", "depths", "trials", "filler") if k in passkey}, "student": passkey["teacher"]}


def passkey_grid_table(runs: list[dict]) -> str | None:
    """Part 3: one table, a row per (model, context), a column per depth (the union of the runs' depths); a teacher
    row for each way the runs drew their keys (5 on one filler, 20 each with its own...), from the first run that did."""
    grids: dict[str, dict] = {}
    for pk in [r["passkey"] for r in runs if "teacher" in r.get("passkey", {})]:
        grids.setdefault(passkey_protocol(pk), teacher_grid(pk))
    models = [("teacher", {"passkey": g}) for g in grids.values()] + [(r["run"], r) for r in runs if "passkey" in r]
    if not models:
        return None
    depths = sorted({d for _, r in models for d in r["passkey"]["depths"]})
    rows = []
    for name, r in models:
        pk = r["passkey"]
        if "student" not in pk:
            continue
        for c, accs in zip(pk["contexts"], pk["student"]):
            by_depth = dict(zip(pk["depths"], accs))
            rows.append([name, c, passkey_protocol(pk)] + [f"{by_depth[d]:.2f}" if d in by_depth else "-" for d in depths])
    return markdown_table(["model", "context", "keys"] + [f"depth {d:g}" for d in depths], rows)


def render_comparison(runs: list[dict]) -> str:
    """The comparison document for runs' figures (:func:`run_figures`), teacher row included."""
    names = [r["run"] for r in runs]
    if len(set(names)) < len(names):  # two folders of one name: tell them apart by their paths
        runs = [{**r, "run": r["path"]} for r in runs]
    teacher = teacher_row(runs)
    lines = [f"# attnedit comparison: {len(runs)} run{'s' * (len(runs) != 1)}", ""]
    lines += ["Runs: " + ", ".join(f"`{r['run']}` ({r['path']})" for r in runs) + ".", ""]
    lines += [
        "## Runs",
        "",
        "- settings: only those that differ between the runs (recipe.yaml), besides target and each stage's tokens;",
        "- KV % of T: the KV cache's bytes per token as % of the teacher's, at the largest context of the run's KV "
        "figures (summary.json, else bench.json);",
        "- held-out KL: KL(teacher || student) on the held-out blocks after stage 2 (summary.json);",
        "- ppl @N (Δ%): WikiText-2 perplexity with an N-token window, and its change vs the teacher in %;",
        f"- zero-shot acc %: mean over the run's few-shot tasks of {ZERO_SHOT_RULE}; in brackets the difference "
        "from the teacher's mean over the same tasks, in points; [k of n tasks] where a run has only some of them;",
        "- passkey @C: passkey retrieval accuracy at context C, mean over depths (0..1 = share of trials);",
        "- changes are against the teacher figures in the run's own files (else the teacher row); the teacher row "
        "takes each figure from the first run that has it; '-': the run folder lacks that input.",
        "",
        runs_table(runs, teacher),
    ]
    extra = notes(runs, teacher)
    if extra:
        lines += ["", *extra]
    lines += ["", "## Zero-shot accuracy per task", ""]
    table = zero_shot_table(runs, teacher)
    if table:
        lines += [f"Accuracy in % ± stderr: {ZERO_SHOT_RULE}.", "", table]
    else:
        lines += ["_No few-shot tasks in these runs' eval.json (attnedit eval MODEL --teacher T --tasks arc_easy,piqa ...)._"]
    lines += ["", "## Passkey retrieval", ""]
    table = passkey_grid_table(runs)
    if table:
        lines += ["Accuracy per (context, depth); depth 0 puts the key at the start of the filler, 1 right before the question.", "", table]
        absent = [r["run"] for r in runs if "passkey" not in r]
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
