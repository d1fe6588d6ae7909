"""Quality of a converted model next to its teacher, same run, same data: ``eval.json``.

Layout of ``eval.json`` (``attnedit eval ... --save FILE``)::

    {"model": str, "teacher": str | null,
     "tasks": {TASK: {"student": {METRIC: value, METRIC + "_stderr": value},
                      "teacher": {...} | null,
                      "ratio": {METRIC: student / teacher} | null}},
     "limit": int | null, "num_fewshot": int | null,
     "perplexity": {"max_length": int, "stride": int, "max_tokens": int | null,
                    "contexts": [int], "strides": [int]},
     "device": str, "dtype": str}

``perplexity`` gives the first window's length and stride, then every window's (``--ppl-context`` takes
several). Task ``wikitext2`` (with several windows: ``wikitext2@N`` for each window N) has metrics ``ppl``
(token-level), ``nll`` (nats per token) and ``tokens`` (scored tokens); the few-shot tasks have ``acc``/``acc_norm`` and their stderr as lm-evaluation-harness
reports them. Ratios exist for every metric but stderr and ``tokens``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from ..errors import AttnEditError
from ..paths import data_root
from ..schema import FieldError, require, setting
from .harness import LOCAL_TASKS, HarnessSettings, check_data, run_harness, split_tasks
from .perplexity import WIKITEXT2_FILE, PerplexitySettings, perplexity, tokenize_text, wikitext2_text
from .progress import Progress, models_key

PPL_TASK = "wikitext2"
KNOWN_TASKS = (PPL_TASK, *LOCAL_TASKS)
DEFAULT_TASKS = ("wikitext2", "arc_easy", "hellaswag", "piqa")
NO_RATIO = {"tokens"}


@dataclass
class QualitySettings:
    """What ``attnedit eval`` measures and how (its flags, and the recipe's ``eval:`` section)."""

    tasks: list[str] = setting(
        list(DEFAULT_TASKS),
        f"comma-separated: {PPL_TASK} (perplexity) and the offline few-shot tasks {', '.join(LOCAL_TASKS)}; "
        "with internet, any other lm-evaluation-harness task",
    )
    limit: int | None = setting(None, "first N examples of each few-shot task (default: all)")
    num_fewshot: int | None = setting(None, "in-context examples per question (default: the task's, 0)")
    batch_size: int | Literal["auto"] = setting(8, "harness batch size, or auto")
    ppl_context: list[int] = setting([2048], f"perplexity window in tokens, capped at the model's maximum; several windows give one {PPL_TASK}@N result each")
    ppl_stride: int | None = setting(None, "tokens between perplexity windows (default: half the window)")
    ppl_tokens: int | None = setting(None, "score only the first N tokens of WikiText-2 (default: all, 304,986 for SmolLM2)")
    data_dir: str | None = setting(None, "folder with wikitext-2-raw/ and fewshot/ (default: $ATTNEDIT_SHARED_DATA, else ../shared/data)")

    def __post_init__(self):
        self.tasks, self.ppl_context = list(dict.fromkeys(self.tasks)), list(dict.fromkeys(self.ppl_context))
        require(self, [
            (self.limit is None or self.limit >= 1, "limit", "must be at least 1 (or none for all)"),
            (self.num_fewshot is None or self.num_fewshot >= 0, "num_fewshot", "must be 0 or more"),
            (self.batch_size == "auto" or self.batch_size >= 1, "batch_size", "must be a positive integer or auto"),
            (all(c >= 2 for c in self.ppl_context), "ppl_context", "windows must be at least 2 tokens"),
            (bool(self.ppl_context) or PPL_TASK not in self.tasks, "ppl_context", f"{PPL_TASK} needs at least one window"),
            (self.ppl_stride is None or self.ppl_stride >= 1, "ppl_stride", "must be at least 1"),
            (self.ppl_stride is None or all(self.ppl_stride <= c for c in self.ppl_context), "ppl_stride",
             "must not exceed the perplexity window (ppl_context)"),
            (self.ppl_tokens is None or self.ppl_tokens >= 2, "ppl_tokens", "must be at least 2"),
        ])  # fmt: skip
        try:
            split_tasks([t for t in self.tasks if t != PPL_TASK])  # names neither offline nor in the harness
        except AttnEditError as e:
            raise FieldError("tasks", self.tasks, str(e)) from None

    def windows(self) -> dict[str, PerplexitySettings]:
        """The perplexity results' task names (``wikitext2``, or ``wikitext2@N`` per window when there are
        several) and each one's window, stride and token cap."""
        several = len(self.ppl_context) > 1
        return {f"{PPL_TASK}@{c}" if several else PPL_TASK: PerplexitySettings(c, self.ppl_stride or max(1, c // 2), self.ppl_tokens) for c in self.ppl_context}

    def result_names(self) -> list[str]:
        """The tasks of the result, in order: each perplexity window in place of ``wikitext2``."""
        out = []
        for t in self.tasks:
            out += list(self.windows()) if t == PPL_TASK else [t]
        return out


def data_dir_of(settings: QualitySettings) -> Path:
    return Path(settings.data_dir).expanduser() if settings.data_dir else data_root()


def evaluate_model(
    name: str, settings: QualitySettings, device: str = "cpu", dtype: str = "float32", skip=(), on_result: Callable[[str, dict], None] | None = None
) -> dict:
    """``settings.tasks`` for one model (a teacher name or an edited checkpoint): ``{task: metrics}``, one
    ``wikitext2`` entry per perplexity window (:meth:`QualitySettings.windows`). Results named in ``skip`` are not
    measured (nor returned); each other one goes to ``on_result(task, metrics)`` as soon as it is done."""
    import torch

    from ..teachers import load_model, local_path

    data_dir = data_dir_of(settings)
    keep = on_result or (lambda task, metrics: None)
    out = {}
    windows = {t: w for t, w in settings.windows().items() if t not in skip} if PPL_TASK in settings.tasks else {}
    if windows:
        text = wikitext2_text(data_dir / WIKITEXT2_FILE)
        model, tokenizer = load_model(name, dtype=getattr(torch, dtype), device=device)
        if tokenizer is None:
            raise AttnEditError(
                f"{name} has no tokenizer (its teacher had none); perplexity needs one: save the teacher's tokenizer "
                f"into it (tokenizer.save_pretrained), or edit again with attnedit edit ... --tokenizer PATH"
            )
        ids = tokenize_text(tokenizer, text, settings.ppl_tokens)
        for task, window in windows.items():
            out[task] = perplexity(model, ids, window, progress=f"{task} {name}").metrics()
            keep(task, out[task])
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    fewshot = [t for t in settings.tasks if t != PPL_TASK and t not in skip]
    if fewshot:
        harness = HarnessSettings(settings.limit, settings.num_fewshot, settings.batch_size, device, dtype)
        out.update(run_harness(local_path(name), fewshot, data_dir / "fewshot", harness, on_task=keep))
    return {t: out[t] for t in settings.result_names() if t in out}


def check_quality(settings: QualitySettings) -> None:
    """The data files the tasks read exist (one line naming the first missing one); no model is loaded."""
    data_dir = data_dir_of(settings)
    if PPL_TASK in settings.tasks:
        wikitext2_text(data_dir / WIKITEXT2_FILE)
    check_data(list(settings.tasks), data_dir / "fewshot")


def ratios(student: dict, teacher: dict) -> dict:
    """student / teacher for every metric both have (not stderr, not counts; None where teacher is 0)."""
    out = {}
    for metric, s in student.items():
        t = teacher.get(metric)
        if metric.endswith("_stderr") or metric in NO_RATIO or s is None or t is None:
            continue
        out[metric] = s / t if t else None
    return out


class QualityRun:
    """One quality evaluation, student and (optionally) teacher on the same tasks and data, made in pieces: each
    perplexity window and each few-shot task of each model is one piece. With a ``progress`` file, every piece is
    written there as soon as it is done, and a new run with the same models and settings starts from what the file
    holds, so an evaluation that a time limit or a signal stopped goes on where it stopped. A progress file of other
    settings or of other weights (their files' sizes and times) is ignored and replaced.

    :meth:`perplexity` and :meth:`fewshot` make their pieces (``convert`` runs the short passkey and bench parts
    between them); :meth:`result` makes what is still missing and returns the ``eval.json`` dict; :meth:`close`
    removes the progress file once the result is written."""

    def __init__(self, model: str, teacher: str | None, settings: QualitySettings, device: str = "cpu", dtype: str = "float32",
                 progress: str | Path | None = None):  # fmt: skip
        from ..teachers import load_config

        if not settings.tasks:
            raise AttnEditError(f"no tasks to evaluate; known tasks: {', '.join(KNOWN_TASKS)}")
        # bad input fails here, in one line, before minutes of work
        for name in (model, teacher):
            if name is not None:
                load_config(name)
        check_quality(settings)
        self.model, self.teacher, self.settings, self.device, self.dtype = model, teacher, settings, str(device), dtype
        key = {
            **models_key(model, teacher), "limit": settings.limit, "num_fewshot": settings.num_fewshot, "batch_size": settings.batch_size,
            "ppl_context": settings.ppl_context, "ppl_stride": settings.ppl_stride, "ppl_tokens": settings.ppl_tokens,
            "data_dir": str(data_dir_of(settings).resolve()), "device": torch_device_type(self.device), "dtype": dtype,
        }  # fmt: skip
        self.progress = Progress(progress, key)

    def models(self) -> list[tuple[str, str]]:
        return [("student", self.model)] + ([("teacher", self.teacher)] if self.teacher else [])

    def kept(self) -> list[str]:
        """The pieces already done, as ``student:TASK`` / ``teacher:TASK``."""
        return [f"{who}:{task}" for who, _ in self.models() for task in self.progress.done(who)]

    def _run(self, tasks: list[str]) -> None:
        settings = replace(self.settings, tasks=[t for t in self.settings.tasks if t in tasks])
        if not settings.tasks:
            return
        for who, name in self.models():
            keep = lambda task, metrics, who=who: self.progress.put(who, task, metrics)  # noqa: E731
            evaluate_model(name, settings, self.device, self.dtype, skip=set(self.progress.done(who)), on_result=keep)

    def perplexity(self) -> None:
        """The WikiText-2 windows of both models (seconds to minutes): the pieces not done yet."""
        self._run([PPL_TASK])

    def fewshot(self) -> None:
        """The few-shot tasks of both models, one task after another: the pieces not done yet."""
        self._run([t for t in self.settings.tasks if t != PPL_TASK])

    def result(self) -> dict:
        """Every piece (made where missing), as the ``eval.json`` dict (built as its record, :class:`attnedit.results.Quality`)."""
        from ..results import Quality

        self.perplexity()
        self.fewshot()
        student, reference = self.progress.done("student"), self.progress.done("teacher")
        tasks = {
            task: {
                "student": student[task],
                "teacher": reference.get(task) if self.teacher else None,
                "ratio": ratios(student[task], reference[task]) if self.teacher else None,
            }
            for task in self.settings.result_names()
        }
        windows = list(self.settings.windows().values())
        return Quality(
            model=self.model,
            teacher=self.teacher,
            tasks=tasks,
            limit=self.settings.limit,
            num_fewshot=self.settings.num_fewshot,
            perplexity={**asdict(windows[0]), "contexts": [w.max_length for w in windows], "strides": [w.stride for w in windows]},
            device=self.device,
            dtype=self.dtype,
        ).to_dict()

    def close(self) -> None:
        """Remove the progress file (its pieces are in the written result)."""
        self.progress.close()


def torch_device_type(device: str) -> str:
    """``cuda:1`` -> ``cuda``: pieces measured on one GPU of a kind stand for another's."""
    return str(device).split(":", 1)[0]


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
