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


def cell_list(text: str) -> list[tuple[int, int]]:
    """``1x8192,64x8192`` -> ``[(1, 8192), (64, 8192)]`` (batch x context)."""
    try:
        return [tuple(int(v) for v in x.lower().split("x", 1)) for x in text.split(",") if x.strip()]  # type: ignore[misc]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give BATCHxCONTEXT cells, e.g. 1x8192,64x8192") from None


def add_model_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    """MODEL, --teacher, --device, --dtype, --json, --save: shared by bench (``many``: MODEL ...) and passkey."""
    if many:
        p.add_argument(
            "model", nargs="+", help="edited checkpoint folder(s) (from attnedit edit or convert); several are timed "
            "in one run next to one timing of the teacher, and saved one JSON each"
        )
    else:
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
    students, teacher, tokenizer, dtype = load_students(args, [args.model])
    return students[args.model], teacher, tokenizer, dtype


def load_students(args, models: list[str]):
    """({folder: student}, teacher, tokenizer, dtype name), every model on the chosen device in the chosen dtype."""
    from ..eval.bench import check_contexts
    from ..teachers import load_config, load_model

    for model in models:  # check everything that needs no weights first
        config = load_config(model)
        if getattr(config, "model_type", None) != "attnedit":
            raise AttnEditError(f"{model} is not an edited model; give the output folder of attnedit edit or convert")
        check_contexts(config, args.contexts, "the model")
    check_contexts(load_config(args.teacher), args.contexts, "the teacher")
    device = device_of(args)
    dtype = dtype_of(args, device)
    students, tokenizer = {}, None
    for model in models:
        students[model], tokenizer = load_model(model, dtype=DTYPES[dtype], device=device)
    teacher, _ = load_model(args.teacher, dtype=DTYPES[dtype], device=device)
    return students, teacher, tokenizer, dtype


def save_paths(save: str | None, models: list[str]) -> dict[str, Path | None]:
    """Where each model's bench JSON goes: --save FILE for one model; for several, FILE's name with each
    model's name added (``bench.json`` -> ``bench-<name>.json``, the name being the folder's, or its
    parent's for a run's ``model/`` folder)."""
    if not save:
        return {m: None for m in models}
    if len(models) == 1:
        return {models[0]: Path(save)}
    names = {m: (Path(m).parent.name if Path(m).name == "model" else Path(m).name) or "model" for m in models}
    if len(set(names.values())) < len(models):
        names = {m: f"{names[m]}{i}" for i, m in enumerate(models)}
    base = Path(save)
    return {m: base.with_name(f"{base.stem}-{names[m]}{base.suffix or '.json'}") for m in models}


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
    add_model_args(p, many=True)
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
        "--stock-cells",
        type=cell_list,
        metavar="BxC,...",
        help="time the stock path only at these cells of the grid, e.g. 1x8192,64x8192 (it compiles once per "
        "shape, about 2 minutes each on an H100; default: every cell)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile attnedit's decode steps in every cell (torch.profiler): kernels per step, device "
        "time per step, time by kernel family and the costliest kernels, saved under each engine's 'profile'",
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
    from ..eval.bench import BenchSettings, format_bench, run_bench_many
    from ..eval.passkey import DEFAULT_DEPTHS, format_passkey, run_passkey

    settings = BenchSettings(
        args.contexts, args.batches, args.decode_tokens, args.repeats, args.warmup,
        stock=not args.no_stock, compile=False if args.no_compile else None, stock_cells=args.stock_cells,
        profile=args.profile,
    )
    missing = [c for c in args.stock_cells or [] if c[0] not in args.batches or c[1] not in args.contexts]
    if missing:
        raise AttnEditError(f"--stock-cells {missing[0][0]}x{missing[0][1]} is not in the grid --batches x --contexts")
    models = list(dict.fromkeys(args.model))
    if args.passkey and len(models) > 1:
        raise AttnEditError("--passkey takes one model; run attnedit passkey for each of the others")
    students, teacher, tokenizer, dtype = load_students(args, models)
    paths = save_paths(args.save, models)

    def save(results: dict) -> None:  # after every engine too, so a run cut short keeps what it measured
        for m, path in paths.items():
            if path:
                write_json(path, {"model": m, "teacher": args.teacher, **results[m]})

    results = run_bench_many(students, teacher, settings, dtype, log=log, partial=save)
    save(results)
    results = {m: {"model": m, "teacher": args.teacher, **results[m]} for m in models}
    passkey = None
    if args.passkey:
        passkey = {
            "model": models[0],
            "teacher_model": args.teacher,
            **run_passkey(
                {"student": students[models[0]], "teacher": teacher}, tokenizer, args.contexts, list(DEFAULT_DEPTHS), log=log
            ),
        }
    if passkey and paths[models[0]]:
        write_json(paths[models[0]].with_name("passkey.json"), passkey)
    if args.json:
        out = results[models[0]] if len(models) == 1 else results
        print(json.dumps({**out, "passkey": passkey} if passkey else out, indent=2))
    else:
        for m in models:
            print((f"== {m}\n" if len(models) > 1 else "") + format_bench(results[m]))
        if passkey:
            print("\n" + format_passkey(passkey))
    return 0
