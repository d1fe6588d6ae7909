"""``attnedit eval``: perplexity and few-shot accuracy of a converted model next to its teacher."""

from __future__ import annotations

import argparse
import json

from ..errors import AttnEditError
from ..io import write_json
from .common import RUN_AUTO, add_device_args, device_of, dtype_of


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def batch_size(text: str) -> int | str:
    """A positive integer, or ``auto``."""
    try:
        return text if text == "auto" else positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive integer or auto") from None


def add_parser(sub) -> None:
    from ..eval.quality import DEFAULT_TASKS, KNOWN_TASKS

    p = sub.add_parser(
        "eval",
        help="perplexity (WikiText-2) and few-shot accuracy (lm-evaluation-harness): student vs teacher",
        description="Token-level perplexity on WikiText-2 raw test (sliding window with stride) and "
        "multiple-choice accuracy through lm-evaluation-harness (the model runs as the harness's hf model "
        "with trust_remote_code), for the model and its teacher on the same data. Offline tasks read "
        f"local files under --data-dir: {', '.join(KNOWN_TASKS)}. With internet, any other "
        "lm-evaluation-harness task name works too.",
        epilog="examples:\n"
        "  attnedit eval runs/smol-mla/model --teacher smollm2-135m --tasks wikitext2,arc_easy,hellaswag,piqa\n"
        "  attnedit eval runs/smol-mla/model --teacher smollm2-135m --limit 100 --ppl-tokens 20000 --save runs/smol-mla/eval.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="edited checkpoint folder (or any model: Hugging Face id, folder, .gguf, smollm2-135m)")
    p.add_argument("--teacher", help="the teacher to compare with, evaluated in the same run (default: none)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated (default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--limit", type=positive, help="first N examples of each few-shot task (default: all)")
    p.add_argument("--num-fewshot", type=int, help="in-context examples per question (default: the task's, 0)")
    p.add_argument("--batch-size", type=batch_size, default=8, help="harness batch size, or auto (default 8)")
    p.add_argument("--ppl-context", type=positive, default=2048, help="perplexity window in tokens, capped at the model's maximum (default 2048)")
    p.add_argument("--ppl-stride", type=positive, default=1024, help="tokens between perplexity windows (default 1024)")
    p.add_argument("--ppl-tokens", type=positive, help="score only the first N tokens of WikiText-2 (default: all, 304,986 for SmolLM2)")
    p.add_argument("--data-dir", help="folder with wikitext-2-raw/ and fewshot/ (default: $ATTNEDIT_SHARED_DATA, else ../shared/data)")
    add_device_args(p, RUN_AUTO)
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--save", metavar="FILE", help="also write the JSON to FILE (e.g. RUN/eval.json, read by attnedit report)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.perplexity import PerplexitySettings
    from ..eval.quality import QualitySettings, evaluate_quality, parse_tasks, quality_rows
    from ..tables import text_table

    if args.ppl_stride > args.ppl_context:
        raise AttnEditError("--ppl-stride must not exceed --ppl-context")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise AttnEditError("--num-fewshot must be 0 or more")
    device = device_of(args)
    dtype = dtype_of(args, device)
    settings = QualitySettings(
        tasks=parse_tasks(args.tasks),
        data_dir=args.data_dir,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=str(device),
        dtype=dtype,
        perplexity=PerplexitySettings(args.ppl_context, args.ppl_stride, args.ppl_tokens),
    )
    result = evaluate_quality(args.model, args.teacher, settings)
    if args.save:
        write_json(args.save, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(text_table(["task", "metric", "student", "teacher", "student/teacher"], quality_rows(result), right={2, 3, 4}))
        if args.save:
            print(f"\nsaved {args.save}")
    return 0
