"""Quality of a converted model next to its teacher, same run, same data: ``eval.json``.

Layout of ``eval.json`` (``attnedit eval ... --save FILE``)::

    {"model": str, "teacher": str | null,
     "tasks": {TASK: {"student": {METRIC: value, METRIC + "_stderr": value},
                      "teacher": {...} | null,
                      "ratio": {METRIC: student / teacher} | null}},
     "limit": int | null, "num_fewshot": int | null,
     "perplexity": {"max_length": int, "stride": int, "max_tokens": int | null},
     "device": str, "dtype": str}

Task ``wikitext2`` has metrics ``ppl`` (token-level), ``nll`` (nats per token) and ``tokens`` (scored
tokens); the few-shot tasks have ``acc``/``acc_norm`` and their stderr as lm-evaluation-harness
reports them. Ratios exist for every metric but stderr and ``tokens``.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import AttnEditError
from ..paths import data_root
from .harness import LOCAL_TASKS, HarnessSettings, check_data, run_harness, split_tasks
from .perplexity import WIKITEXT2_FILE, PerplexitySettings, perplexity, tokenize_text, wikitext2_text

PPL_TASK = "wikitext2"
KNOWN_TASKS = (PPL_TASK, *LOCAL_TASKS)
DEFAULT_TASKS = ("wikitext2", "arc_easy", "hellaswag", "piqa")
NO_RATIO = {"tokens"}


@dataclass(frozen=True)
class QualitySettings:
    """Which tasks, where their data lives, and how to run them."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    data_dir: str | None = None  # holds wikitext-2-raw/ and fewshot/ (default: attnedit.paths.data_root())
    limit: int | None = None  # few-shot examples per task
    num_fewshot: int | None = None
    batch_size: int | str = 8
    device: str = "cpu"
    dtype: str = "float32"
    perplexity: PerplexitySettings = field(default_factory=PerplexitySettings)


def data_dir_of(settings: QualitySettings) -> Path:
    return Path(settings.data_dir).expanduser() if settings.data_dir else data_root()


def parse_tasks(text: str) -> tuple[str, ...]:
    """``"wikitext2,arc_easy"`` -> ``("wikitext2", "arc_easy")``; unknown names fail with the known list."""
    tasks = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not tasks:
        raise AttnEditError(f"--tasks is empty; known tasks: {', '.join(KNOWN_TASKS)}")
    split_tasks([t for t in tasks if t != PPL_TASK])  # raises for names neither local nor in the harness
    return tasks


def evaluate_model(name: str, settings: QualitySettings) -> dict:
    """All of ``settings.tasks`` for one model (a teacher name or an edited checkpoint): ``{task: metrics}``."""
    import torch

    from ..teachers import load_model, local_path

    data_dir = data_dir_of(settings)
    out = {}
    if PPL_TASK in settings.tasks:
        text = wikitext2_text(data_dir / WIKITEXT2_FILE)
        model, tokenizer = load_model(name, dtype=getattr(torch, settings.dtype), device=settings.device)
        if tokenizer is None:
            raise AttnEditError(f"{name} has no tokenizer; save one with the model (attnedit edit does)")
        ids = tokenize_text(tokenizer, text, settings.perplexity.max_tokens)
        out[PPL_TASK] = perplexity(model, ids, settings.perplexity, progress=f"{PPL_TASK} {name}").metrics()
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    fewshot = [t for t in settings.tasks if t != PPL_TASK]
    if fewshot:
        harness = HarnessSettings(settings.limit, settings.num_fewshot, settings.batch_size, settings.device, settings.dtype)
        out.update(run_harness(local_path(name), fewshot, data_dir / "fewshot", harness))
    return {t: out[t] for t in settings.tasks}


def ratios(student: dict, teacher: dict) -> dict:
    """student / teacher for every metric both have (not stderr, not counts; None where teacher is 0)."""
    out = {}
    for metric, s in student.items():
        t = teacher.get(metric)
        if metric.endswith("_stderr") or metric in NO_RATIO or s is None or t is None:
            continue
        out[metric] = s / t if t else None
    return out


def evaluate_quality(model: str, teacher: str | None, settings: QualitySettings) -> dict:
    """Student and (optionally) teacher on the same tasks and data; the ``eval.json`` dict."""
    from ..teachers import load_config

    # bad input fails here, in one line, before minutes of work
    for name in (model, teacher):
        if name is not None:
            load_config(name)
    data_dir = data_dir_of(settings)
    if PPL_TASK in settings.tasks:
        wikitext2_text(data_dir / WIKITEXT2_FILE)
    check_data(list(settings.tasks), data_dir / "fewshot")
    student = evaluate_model(model, settings)
    reference = evaluate_model(teacher, settings) if teacher else {}
    tasks = {
        task: {
            "student": student[task],
            "teacher": reference.get(task),
            "ratio": ratios(student[task], reference[task]) if teacher else None,
        }
        for task in settings.tasks
    }
    return {
        "model": model,
        "teacher": teacher,
        "tasks": tasks,
        "limit": settings.limit,
        "num_fewshot": settings.num_fewshot,
        "perplexity": asdict(settings.perplexity),
        "device": settings.device,
        "dtype": settings.dtype,
    }


def quality_rows(result: dict) -> list[list]:
    """Table rows ``[task, metric, student, teacher, ratio]``, values as ``x ± stderr`` strings."""

    def cell(figures, metric):
        if not figures or figures.get(metric) is None:
            return "-"
        value, err = figures[metric], figures.get(f"{metric}_stderr")
        text = f"{value:,.0f}" if metric in NO_RATIO else f"{value:.4f}"
        return text if err is None else f"{text} ± {err:.4f}"

    rows = []
    for task, t in result["tasks"].items():
        for metric in (m for m in t["student"] if not m.endswith("_stderr")):
            r = (t["ratio"] or {}).get(metric)
            rows.append([task, metric, cell(t["student"], metric), cell(t["teacher"], metric), "-" if r is None else f"{r:.4f}"])
    return rows
