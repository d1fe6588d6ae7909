"""The recipe's ``eval:`` section, which ``convert`` runs once the model is saved.

Each part goes through the function its own command uses, with the same settings and the same JSON:
``eval.json`` (``attnedit eval``: perplexity and few-shot tasks), ``passkey.json`` (``attnedit passkey``)
and ``bench.json`` (``attnedit bench``), student next to teacher, each written atomically into the run
folder as soon as it is done; then ``report.md`` with its plots (``attnedit report``). A part runs when its
list is not empty (``eval.tasks``, ``eval.passkey.contexts``, ``eval.bench.contexts``); with none, convert
does exactly what it did before there was an eval section.

A part whose file is in the run folder is done: ``convert RUN --resume`` on a run whose model is saved
trains nothing and makes only the missing files (delete one to have it made again). Under torchrun only
rank 0 evaluates, once the training processes are done with the model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ..devices import resolve_device, run_dtype
from ..errors import AttnEditError
from ..eval.passkey import filler_note
from ..io import remove_temp_files
from ..recipe import EvalConfig, Recipe
from ..results import Bench, Passkey, Quality, read_any

PARTS = {Quality.FILE: "quality (attnedit eval)", Passkey.FILE: "passkey retrieval", Bench.FILE: "decode benchmark"}


def missing_parts(recipe: Recipe, run_dir: Path) -> list[str]:
    """The result files the recipe's eval section asks for that the run folder does not hold yet."""
    return [name for name in recipe.eval.parts() if not (run_dir / name).is_file()]


def check_eval(recipe: Recipe, teacher_config) -> None:
    """What the eval section needs, checked from files and the teacher's config before any training: the
    data the tasks read, the harness for few-shot tasks, contexts the teacher supports. One line each."""
    from ..eval.harness import LOCAL_TASKS, data_files
    from ..eval.kv import max_context
    from ..eval.perplexity import WIKITEXT2_FILE
    from ..eval.quality import PPL_TASK, data_dir_of

    cfg = recipe.eval
    data_dir = data_dir_of(cfg)
    where = "set eval.data_dir to the folder that holds it" if not cfg.data_dir else "fix eval.data_dir"
    if PPL_TASK in cfg.tasks and not (data_dir / WIKITEXT2_FILE).is_file():
        raise AttnEditError(f"eval.tasks has {PPL_TASK}, which reads {data_dir / WIKITEXT2_FILE}; that file does not exist: {where}")
    for task in (t for t in cfg.tasks if t in LOCAL_TASKS):
        missing = [str(f) for f in data_files(task, data_dir / "fewshot") if not f.is_file()]
        if missing:
            raise AttnEditError(f"eval.tasks has {task}, which reads {missing[0]}; that file does not exist: {where}")
    fewshot = [t for t in cfg.tasks if t != PPL_TASK]
    if fewshot and importlib.util.find_spec("lm_eval") is None:
        raise AttnEditError(f"eval.tasks has {fewshot[0]}, which needs lm-evaluation-harness: pip install lm-eval (or drop the task)")
    limit = max_context(teacher_config)
    for name, contexts in (("eval.passkey.contexts", cfg.passkey.contexts), ("eval.bench.contexts", cfg.bench.contexts)):
        if limit and contexts and max(contexts) > limit:
            raise AttnEditError(f"{name}: {max(contexts)} is longer than the teacher supports ({limit} tokens); use shorter contexts")


def describe(cfg: EvalConfig) -> list[str]:
    """One line per part the section asks for, for the ``--dry-run`` plan."""
    lines = []
    if cfg.tasks:
        windows = ", ".join(f"{w.max_length} (stride {w.stride})" for w in cfg.windows().values())
        tasks = [f"wikitext2 perplexity at {windows}" if t == "wikitext2" else t for t in cfg.tasks]
        fewshot = any(t != "wikitext2" for t in cfg.tasks)
        notes = [f"first {cfg.ppl_tokens:,} tokens of WikiText-2"] if cfg.ppl_tokens and "wikitext2" in cfg.tasks else []
        notes += [f"first {cfg.limit} examples per task"] if cfg.limit and fewshot else []
        notes += [f"{cfg.num_fewshot}-shot"] if cfg.num_fewshot and fewshot else []
        lines.append(f"eval.json: {', '.join(tasks)}" + (f" ({'; '.join(notes)})" if notes else ""))
    if cfg.passkey.contexts:
        p = cfg.passkey
        lines.append(f"passkey.json: contexts {_ints(p.contexts)} x depths {','.join(f'{d:g}' for d in p.depths)}, {p.trials} trials" + filler_note(p.filler))
    if cfg.bench.contexts:
        b = cfg.bench
        lines.append(f"bench.json: batches {_ints(b.batches)} x contexts {_ints(b.contexts)}, {b.decode_tokens} decode tokens")
    return lines


def _ints(values) -> str:
    return ",".join(str(v) for v in values)


def evaluate_run(recipe: Recipe, run_dir: Path, quiet: bool = False) -> list[str]:
    """Make the missing result files of the recipe's eval section, then ``report.md``; returns the files made.

    The saved model (``run_dir/model``) is compared with ``recipe.teacher`` on ``recipe.device``, in
    bfloat16 on CUDA and float32 elsewhere (as ``--dtype auto``)."""
    from ..eval.bench import release_memory, run_bench
    from ..eval.models import load_students
    from ..eval.passkey import passkey_json
    from ..eval.progress import progress_path
    from ..eval.quality import QualityRun
    from ..report import build_report
    from ..teachers import load_config

    cfg = recipe.eval
    if not cfg.parts():
        return []
    check_eval(recipe, load_config(recipe.teacher))
    remove_temp_files(run_dir)  # a write a killed evaluation left behind
    release_memory()
    todo = missing_parts(recipe, run_dir)
    log = (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    model, teacher = str(run_dir / "model"), recipe.teacher
    device = resolve_device(recipe.device)
    dtype = run_dtype("auto", device)
    if todo:
        log(f"attnedit: evaluating {model} next to {teacher}: {', '.join(PARTS[p] for p in todo)}")
    try:
        # the short parts first (perplexity, passkey, bench), the few-shot tasks last; every finished piece of the
        # quality part is kept in eval.progress.json, so a time limit or a signal loses at most the piece in progress
        quality = QualityRun(model, teacher, cfg, str(device), dtype, progress_path(Quality.path(run_dir))) if Quality.FILE in todo else None
        if quality is not None:
            if quality.kept():
                log(f"attnedit: {len(quality.kept())} quality figures kept from the stopped evaluation ({quality.progress.path.name})")
            quality.perplexity()
        pair = [p for p in (Passkey.FILE, Bench.FILE) if p in todo]
        if pair:  # both compare the same two models: load them once
            contexts = (cfg.passkey.contexts if Passkey.FILE in pair else []) + (cfg.bench.contexts if Bench.FILE in pair else [])
            students, reference, tokenizer = load_students([model], teacher, contexts, device, dtype)
            if Passkey.FILE in pair:
                kept = progress_path(Passkey.path(run_dir))
                result = passkey_json(model, teacher, students[model], reference, tokenizer, cfg.passkey, log, progress=kept)
                log(f"attnedit: wrote {Passkey.model_validate(result).write(run_dir)}")
                kept.unlink(missing_ok=True)
            if Bench.FILE in pair:
                result = {"model": model, "teacher": teacher, **run_bench(students[model], reference, cfg.bench, dtype, log)}
                log(f"attnedit: wrote {Bench.model_validate(result).write(run_dir)}")
            del students, reference
            release_memory()
        if quality is not None:
            written = Quality.model_validate(quality.result()).write(run_dir)
            quality.close()
            log(f"attnedit: wrote {written}")
    except AttnEditError as e:
        raise AttnEditError(
            f"{e} (evaluation after training; the model is saved in {model}, and attnedit convert {run_dir} --resume makes only the missing result files)"
        ) from None
    build_report(run_dir)
    _card_with_evaluation(recipe, run_dir)
    return todo


def _card_with_evaluation(recipe: Recipe, run_dir: Path) -> None:
    """The model's card again, now with the evaluation next to the teacher (``export/card.py``)."""
    from ..export.card import write_card
    from ..teachers import load_config

    model_dir = run_dir / "model"
    if (model_dir / "config.json").is_file():
        write_card(model_dir, load_config(str(model_dir)), recipe=recipe, run_dir=run_dir)


def format_evaluation(recipe: Recipe, run_dir: Path) -> str:
    """The teacher-vs-student tables of the run's result files (what ``convert`` prints at the end)."""
    from ..eval.bench import format_bench
    from ..eval.passkey import format_passkey
    from ..eval.quality import quality_rows
    from ..tables import text_table

    out = []
    for name in recipe.eval.parts():
        record = read_any(run_dir / name)
        if record is None:
            continue
        result = record.to_dict()
        if isinstance(record, Quality):
            rows = quality_rows(result)
            out.append(text_table(["task", "metric", "student", "teacher", "student/teacher"], rows, right={2, 3, 4}))
        elif isinstance(record, Passkey):
            out.append(format_passkey(result))
        else:
            out.append(format_bench(result))
    if (run_dir / "report.md").is_file():
        out.append(f"report: {run_dir / 'report.md'} (with plots; the JSON beside it)")
    return "\n\n".join(out)
