"""``attnedit bench``: KV bytes, peak memory, time to first token and decode speed, student vs teacher."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import AttnEditError
from ..schema import add_flags, from_args
from .common import RUN_AUTO, add_device_args, add_json, add_model, add_save, add_teacher, check_save, device_of, dtype_of, log, save_results


def add_pair_args(p: argparse.ArgumentParser, many: str = "") -> None:
    """MODEL (``many``: MODEL ...), --teacher, --device, --dtype, --json: what bench and passkey share."""
    add_model(p, many=many)
    add_teacher(p)
    add_device_args(p, RUN_AUTO, "weights and cache dtype")
    add_json(p)


def load_students(args, models: list[str], contexts: list[int]):
    """({folder: student}, teacher, tokenizer, dtype name), every model on --device in --dtype."""
    from ..eval.models import load_students as load

    device = device_of(args)
    dtype = dtype_of(args, device)
    students, teacher, tokenizer = load(models, args.teacher, contexts, device, dtype)
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


def add_parser(sub) -> None:
    from ..eval.bench import BenchSettings
    from ..results import Bench

    p = sub.add_parser(
        "bench",
        help="KV bytes, peak memory, time to first token and decode tokens/s: student vs teacher",
        description="For every (batch, context), three engines prefill `context` random tokens and decode "
        "--decode-tokens more greedily: the student on attnedit's engine (static cache allocated once, "
        "decode step compiled with CUDA graphs on a GPU), the teacher on the same engine, and the teacher "
        "on its best stock path (transformers generate with cache_implementation='static' and its automatic "
        "torch.compile). Per cell: TTFT, decode step ms and tok/s, the step's HBM bound (weights + KV bytes "
        "over the measured copy bandwidth; of a mixture of experts, the experts the batch's tokens reach on "
        "average), KV bytes (measured = analytic), peak memory, compile time. "
        "On CUDA: CUDA events after warm-up. A cell that does not fit in memory is reported with the "
        "largest batch that fits. The settings are the recipe's eval.bench: section.",
        epilog="example:\n  attnedit bench runs/smol-mla/model --teacher smollm2-135m --contexts 1024,4096,8192 "
        "--batches 1,16,64 --save runs/smol-mla/bench.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pair_args(p, many="several are timed in one run next to one timing of the teacher, and saved one JSON each")
    add_save(p, Bench.FILE)
    add_flags(p, BenchSettings)
    p.add_argument(
        "--passkey",
        action="store_true",
        help="also run passkey retrieval at the same contexts (saved as passkey.json beside --save)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.bench import BenchSettings, format_bench, run_bench_many
    from ..eval.passkey import PasskeySettings, format_passkey, passkey_json
    from ..results import Bench, Passkey

    settings = from_args(BenchSettings, args)
    models = list(dict.fromkeys(args.model))
    if args.passkey and len(models) > 1:
        raise AttnEditError("--passkey takes one model; run attnedit passkey for each of the others")
    paths = save_paths(args.save, models)
    passkey_path = paths[models[0]].with_name(Passkey.FILE) if args.passkey and paths[models[0]] else None
    check_save(args, *paths.values(), passkey_path)  # before the models are loaded
    students, teacher, tokenizer, dtype = load_students(args, models, settings.contexts)

    def labelled(raw: dict) -> dict:
        return {m: {"model": m, "teacher": args.teacher, **raw[m]} for m in models}

    def save_partial(raw: dict) -> None:
        """What was measured so far, saved after every engine so that a run cut short keeps it; a failed
        write here only warns (the final write, after the tables, says what went wrong)."""
        try:
            for m, path in paths.items():
                if path:
                    Bench.model_validate(labelled(raw)[m]).write(path)
        except AttnEditError as e:
            log(f"attnedit: warning: {e}")

    results = labelled(run_bench_many(students, teacher, settings, dtype, log=log, partial=save_partial))
    passkey = None
    if args.passkey:
        keys = PasskeySettings(contexts=settings.contexts)
        passkey = passkey_json(models[0], args.teacher, students[models[0]], teacher, tokenizer, keys, log=log)
    if args.json:
        out = results[models[0]] if len(models) == 1 else results
        print(json.dumps({**out, "passkey": passkey} if passkey else out, indent=2))
    else:
        for m in models:
            print((f"== {m}\n" if len(models) > 1 else "") + format_bench(results[m]))
        if passkey:
            print("\n" + format_passkey(passkey))
    # printed first: a failed write loses nothing
    for m, path in paths.items():
        if path:
            save_results(path, Bench.model_validate(results[m]), printed_json=args.json)
    if passkey_path:
        save_results(passkey_path, Passkey.model_validate(passkey), printed_json=args.json)
    return 0
