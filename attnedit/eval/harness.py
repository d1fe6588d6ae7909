"""Few-shot accuracy through lm-evaluation-harness, offline.

The model (teacher or edited checkpoint) runs as the harness's own ``hf`` model with
``trust_remote_code=True``, exactly as a user of the exported checkpoint would run it. The local
tasks are copies of the harness's task definitions (same prompts, preprocessing and metrics) whose
data files point at a local folder: the YAML templates in ``attnedit/eval/tasks`` are rendered into
a temporary folder with the data paths filled in. Other names are passed to the harness as they are
(they need the internet to fetch their data).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from string import Template

from ..errors import AttnEditError

TEMPLATES = Path(__file__).resolve().parent / "tasks"
HELPER = "fewshot_data.py"
PREFIX = "attnedit_"  # local tasks are registered as attnedit_<name>, so they never shadow the harness's own
# offline tasks, one YAML template each; metrics acc and acc_norm (winogrande: acc), as in the harness
LOCAL_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")


class _NoCustomDatasetHint(logging.Filter):
    """Drop the harness's advice to pass ``--metadata``, printed for every task with a ``custom_dataset``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


_HINT_FILTER = _NoCustomDatasetHint()


@dataclass(frozen=True)
class HarnessSettings:
    """How the harness runs: examples per task, shots, batch, and where the model lives."""

    limit: int | None = None  # first N examples of each task (None: all)
    num_fewshot: int | None = None  # None: the task's default (0 for the local tasks)
    batch_size: int | str = 8  # or "auto"
    device: str = "cpu"
    dtype: str = "float32"


def data_files(task: str, fewshot_dir: str | Path) -> list[Path]:
    """The local files a task reads (its few-shot pool and its evaluation split)."""
    text = (TEMPLATES / f"{task}.yaml").read_text()
    return [Path(fewshot_dir) / rel for rel in re.findall(r'"\$\{fewshot\}/([^"]+)"', text)]


def check_data(tasks: list[str], fewshot_dir: str | Path) -> None:
    """Fail with one line naming the first local task whose files are missing."""
    for task in (t for t in tasks if t in LOCAL_TASKS):
        missing = [str(f) for f in data_files(task, fewshot_dir) if not f.is_file()]
        if missing:
            raise AttnEditError(f"task {task} needs {', '.join(missing)}; pass --data-dir with a fewshot/ folder holding them")


def render_tasks(tasks: list[str], fewshot_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the YAMLs of the local ``tasks`` with ``fewshot_dir`` filled in, and their helper module."""
    fewshot_dir = Path(fewshot_dir).expanduser().resolve()
    check_data(tasks, fewshot_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    escaped = json.dumps(str(fewshot_dir))[1:-1]  # the path sits inside a double-quoted YAML string
    for task in tasks:
        text = Template((TEMPLATES / f"{task}.yaml").read_text()).substitute(fewshot=escaped)
        (out / f"{task}.yaml").write_text(text)
    shutil.copy2(TEMPLATES / HELPER, out / HELPER)
    return out


def split_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(local tasks, other harness tasks); an unknown name is a one-line error listing the known ones."""
    local = [t for t in tasks if t in LOCAL_TASKS]
    other = [t for t in tasks if t not in LOCAL_TASKS]
    if other:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        unknown = [t for t in other if t not in known]
        if unknown:
            raise AttnEditError(
                f"unknown task {', '.join(unknown)}; offline tasks: wikitext2, {', '.join(LOCAL_TASKS)} (with internet, any lm-evaluation-harness task name)"
            )
    return local, other


def parse_results(task_results: dict) -> dict:
    """Harness ``{"acc,none": x, "acc_stderr,none": s, ...}`` -> ``{"acc": x, "acc_stderr": s}``."""
    out = {}
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if not filt or metric == "alias":
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric] = None if isinstance(value, float) and math.isnan(value) else float(value)
        elif metric.endswith("_stderr"):
            out[metric] = None  # the harness writes "N/A" when one example cannot give a stderr
    return out


def run_harness(
    model_path: str,
    tasks: list[str],
    fewshot_dir: str | Path,
    settings: HarnessSettings = HarnessSettings(),
    on_task: Callable[[str, dict], None] | None = None,
) -> dict:
    """Run ``tasks`` on the checkpoint at ``model_path``; returns ``{task: {metric: value, metric_stderr: value}}``.

    The model is loaded once (the harness's ``hf`` model) and the tasks run one after another, each task's result
    handed to ``on_task(task, metrics)`` as soon as it is done, so a caller can keep it before the next one starts."""
    local, other = split_tasks(tasks)
    if not other:  # everything is on disk; datasets and huggingface_hub read these when first imported
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval.api.task").addFilter(_HINT_FILTER)  # added once: same object
    out = {}
    with tempfile.TemporaryDirectory(prefix="attnedit-tasks-") as tmp:
        include = str(render_tasks(local, fewshot_dir, tmp)) if local else None
        manager = TaskManager(include_path=include, include_defaults=bool(other))
        # the model as simple_evaluate(model="hf", model_args=...) would make it, once for every task
        lm = get_model("hf").create_from_arg_obj(
            {"pretrained": model_path, "trust_remote_code": True, "dtype": settings.dtype, "device": settings.device},
            {"batch_size": settings.batch_size, "max_batch_size": None, "device": None},
        )
        for task in tasks:
            name = PREFIX + task if task in LOCAL_TASKS else task
            try:
                result = simple_evaluate(
                    model=lm, tasks=[name], num_fewshot=settings.num_fewshot, limit=settings.limit, task_manager=manager, log_samples=False
                )
            except ConnectionError as e:  # a harness task whose data must come from the Hugging Face hub
                raise AttnEditError(f"{str(e).splitlines()[0]}; tasks {', '.join(other)} need the internet (offline: {', '.join(LOCAL_TASKS)})") from None
            found = {**result.get("groups", {}), **result["results"]}
            out[task] = parse_results(found.get(name, {}))
            if on_task is not None:
                on_task(task, out[task])
    return out
