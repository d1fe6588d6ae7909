"""``attnedit passkey``: synthetic passkey retrieval over contexts and depths, student vs teacher."""

from __future__ import annotations

import argparse
import json

from ..schema import add_flags, from_args
from .bench_cmd import add_pair_args, load_students
from .common import add_save, check_save, log, save_results


def add_parser(sub) -> None:
    from ..eval.passkey import PasskeySettings
    from ..results import Passkey

    p = sub.add_parser(
        "passkey",
        help="passkey retrieval accuracy per (context, depth): what sliding windows lose or keep",
        description="Hide a 5-digit key at a given depth of filler text, ask for it, decode greedily through "
        "the real caches; accuracy per (context, depth) over --trials keys, student and teacher. The "
        "settings are the recipe's eval.passkey: section. With --save FILE, each finished row (a model at a context) "
        "is kept in FILE's .progress.json until FILE is written: the same command after a stop goes on from there.",
        epilog="example:\n  attnedit passkey runs/smol-gs/model --teacher smollm2-135m --contexts 1024,4096 --save runs/smol-gs/passkey.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pair_args(p)
    add_save(p, Passkey.FILE)
    add_flags(p, PasskeySettings)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.passkey import PasskeySettings, format_passkey, passkey_json
    from ..eval.progress import progress_path
    from ..results import Passkey

    settings = from_args(PasskeySettings, args)
    check_save(args)  # before the models are loaded
    students, teacher, tokenizer, _ = load_students(args, [args.model], settings.contexts)
    kept = progress_path(args.save) if args.save else None  # each finished row, until --save's file is written
    result = passkey_json(args.model, args.teacher, students[args.model], teacher, tokenizer, settings, log=log, progress=kept)
    print(json.dumps(result, indent=2) if args.json else format_passkey(result))
    if args.save:  # printed first: a failed write loses nothing
        save_results(args.save, Passkey.model_validate(result), printed_json=args.json)
        kept.unlink(missing_ok=True)
    return 0
