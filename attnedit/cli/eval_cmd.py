"""``attnedit eval``: perplexity and few-shot accuracy of a converted model next to its teacher."""

from __future__ import annotations

import argparse
import json
import sys

from ..schema import add_flags, from_args
from .common import RUN_AUTO, add_device_args, add_json, add_model, add_save, add_teacher, check_save, device_of, dtype_of, save_results


def add_parser(sub) -> None:
    from ..eval.quality import KNOWN_TASKS, QualitySettings
    from ..results import Quality

    p = sub.add_parser(
        "eval",
        help="perplexity (WikiText-2) and few-shot accuracy (lm-evaluation-harness): student vs teacher",
        description="Token-level perplexity on WikiText-2 raw test (sliding window with stride) and "
        "multiple-choice accuracy through lm-evaluation-harness (the model runs as the harness's hf model "
        "with trust_remote_code), for the model and its teacher on the same data. Offline tasks read "
        f"local files under --data-dir: {', '.join(KNOWN_TASKS)}. With internet, any other "
        "lm-evaluation-harness task name works too. The settings are the recipe's eval: section "
        "(attnedit recipe --explain), which attnedit convert runs after saving the model. With --save FILE, every "
        "finished figure (a perplexity window or a task, of either model) is kept in FILE's .progress.json until "
        "FILE is written: the same command after a time limit or a signal goes on where it stopped.",
        epilog="examples:\n"
        "  attnedit eval runs/smol-mla/model --teacher smollm2-135m --tasks wikitext2,arc_easy,hellaswag,piqa\n"
        "  attnedit eval runs/smol-mla/model --teacher smollm2-135m --tasks wikitext2 --ppl-context 2048,8192\n"
        "  attnedit eval runs/smol-mla/model --teacher smollm2-135m --limit 100 --ppl-tokens 20000 --save runs/smol-mla/eval.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model(p, "edited checkpoint folder (or any model: Hugging Face id, folder, .gguf, smollm2-135m)")
    add_teacher(p, required=False)
    add_flags(p, QualitySettings)
    add_device_args(p, RUN_AUTO)
    add_json(p)
    add_save(p, Quality.FILE)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import AttnEditError
    from ..eval.progress import progress_path
    from ..eval.quality import KNOWN_TASKS, QualityRun, QualitySettings, quality_rows
    from ..results import Quality
    from ..tables import text_table

    settings = from_args(QualitySettings, args)
    if not settings.tasks:
        raise AttnEditError(f"--tasks is empty; known tasks: {', '.join(KNOWN_TASKS)}")
    check_save(args)  # before minutes of evaluation
    device = device_of(args)
    # with --save, each finished figure is kept beside it (FILE.progress.json) until FILE is written: the same
    # command after a time limit or a signal goes on where it stopped
    quality = QualityRun(args.model, args.teacher, settings, str(device), dtype_of(args, device), progress_path(args.save) if args.save else None)
    if quality.kept():
        print(f"attnedit: {len(quality.kept())} figures kept from the stopped evaluation ({quality.progress.path})", file=sys.stderr)
    result = quality.result()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(text_table(["task", "metric", "student", "teacher", "student/teacher"], quality_rows(result), right={2, 3, 4}))
    if args.save:  # printed first: a failed write loses nothing
        save_results(args.save, Quality.model_validate(result), printed_json=args.json)
        quality.close()
        if not args.json:
            print(f"\nsaved {args.save}")
    return 0
