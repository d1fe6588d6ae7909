"""``attnedit bench``: KV bytes, peak memory, time to first token and decode speed, student vs teacher."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import AttnEditError
from ..io import write_json
from .common import DTYPES, RUN_AUTO, add_device_args, device_of, dtype_of


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --teacher, --device, --dtype, --json, --save: shared by bench and passkey."""
    p.add_argument("model", help="edited checkpoint folder (from attnedit edit or convert)")
    p.add_argument(
        "--teacher",
        required=True,
        help="the teacher it was edited from (Hugging Face id, folder, .gguf or smollm2-135m)",
    )
    add_device_args(p, RUN_AUTO, "weights and cache dtype")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument(
        "--save", metavar="FILE", help="also write the JSON to FILE (e.g. RUN/bench.json, read by attnedit report)"
    )


def load_pair(args):
    """(student, teacher, tokenizer, dtype name), both models on the chosen device in the chosen dtype."""
    from ..eval.bench import check_contexts
    from ..teachers import load_config, load_model

    config = load_config(args.model)  # check everything that needs no weights first
    if getattr(config, "model_type", None) != "attnedit":
        raise AttnEditError(f"{args.model} is not an edited model; give the output folder of attnedit edit or convert")
    check_contexts(config, args.contexts, "the model")
    check_contexts(load_config(args.teacher), args.contexts, "the teacher")
    device = device_of(args)
    dtype = dtype_of(args, device)
    student, tokenizer = load_model(args.model, dtype=DTYPES[dtype], device=device)
    teacher, _ = load_model(args.teacher, dtype=DTYPES[dtype], device=device)
    return student, teacher, tokenizer, dtype


def log(line: str) -> None:
    """Progress lines go to stderr, so that --json output on stdout stays clean."""
    print(line, file=sys.stderr, flush=True)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="KV bytes, peak memory, time to first token and decode tokens/s: student vs teacher",
        description="For every (batch, context), three engines prefill `context` random tokens and decode "
        "--decode-tokens more greedily: the student on attnedit's engine (static cache allocated once, "
        "decode step compiled with CUDA graphs on a GPU), the teacher on the same engine, and the teacher "
        "on its best stock path (transformers generate with cache_implementation='static' and its automatic "
        "torch.compile). Per cell: TTFT, decode step ms and tok/s, the step's HBM bound (weights + KV bytes "
        "over the measured copy bandwidth), KV bytes (measured = analytic), peak memory, compile time. "
        "On CUDA: CUDA events after warm-up. A cell that does not fit in memory is reported with the "
        "largest batch that fits.",
        epilog="example:\n  attnedit bench runs/smol-mla/model --teacher smollm2-135m --contexts 1024,4096,8192 "
        "--batches 1,16,64 --save runs/smol-mla/bench.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument(
        "--contexts", type=int_list, default=[1024, 4096, 8192], help="prompt lengths (default 1024,4096,8192)"
    )
    p.add_argument("--batches", type=int_list, default=[1, 16, 64], help="batch sizes (default 1,16,64)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded after the first one (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per cell before timing (default 1)")
    p.add_argument(
        "--no-stock",
        action="store_true",
        help="skip timing the teacher on stock transformers (static cache + automatic compile)",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="decode eagerly instead of through torch.compile + CUDA graphs (compiled by default on CUDA)",
    )
    p.add_argument(
        "--passkey",
        action="store_true",
        help="also run passkey retrieval at the same contexts (saved as passkey.json beside --save)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.bench import BenchSettings, format_bench, run_bench
    from ..eval.passkey import DEFAULT_DEPTHS, format_passkey, run_passkey

    settings = BenchSettings(
        args.contexts, args.batches, args.decode_tokens, args.repeats, args.warmup,
        stock=not args.no_stock, compile=False if args.no_compile else None,
    )
    student, teacher, tokenizer, dtype = load_pair(args)
    result = {"model": args.model, "teacher": args.teacher, **run_bench(student, teacher, settings, dtype, log=log)}
    passkey = None
    if args.passkey:
        passkey = {
            "model": args.model,
            "teacher_model": args.teacher,
            **run_passkey(
                {"student": student, "teacher": teacher}, tokenizer, args.contexts, list(DEFAULT_DEPTHS), log=log
            ),
        }
    if args.save:
        write_json(args.save, result)
        if passkey:
            write_json(Path(args.save).with_name("passkey.json"), passkey)
    if args.json:
        print(json.dumps({**result, "passkey": passkey} if passkey else result, indent=2))
    else:
        print(format_bench(result))
        if passkey:
            print("\n" + format_passkey(passkey))
    return 0
