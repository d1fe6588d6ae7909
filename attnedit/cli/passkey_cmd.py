"""``attnedit passkey``: synthetic passkey retrieval over contexts and depths, student vs teacher."""

from __future__ import annotations

import argparse
import json

from .bench_cmd import add_model_args, float_list, int_list, load_pair, log, write_json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "passkey",
        help="passkey retrieval accuracy per (context, depth): what sliding windows lose or keep",
        description="Hide a 5-digit key at a given depth of filler text, ask for it, decode greedily through "
        "the real caches; accuracy per (context, depth) over --trials keys, student and teacher.",
        epilog="example:\n  attnedit passkey runs/smol-gs/model --teacher smollm2-135m --contexts 1024,4096 "
        "--save runs/smol-gs/passkey.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument(
        "--contexts",
        type=int_list,
        default=[1024, 2048, 4096],
        help="prompt lengths in tokens (default 1024,2048,4096)",
    )
    p.add_argument(
        "--depths",
        type=float_list,
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="where the key sits, 0 = start .. 1 = end (default 0,0.25,0.5,0.75,1)",
    )
    p.add_argument("--trials", type=int, default=5, help="keys per cell (default 5), run as one batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.passkey import format_passkey, run_passkey

    student, teacher, tokenizer, _ = load_pair(args)
    result = {
        "model": args.model,
        "teacher_model": args.teacher,
        **run_passkey(
            {"student": student, "teacher": teacher},
            tokenizer,
            args.contexts,
            args.depths,
            args.trials,
            args.seed,
            log=log,
        ),
    }
    if args.save:
        write_json(args.save, result)
    print(json.dumps(result, indent=2) if args.json else format_passkey(result))
    return 0
