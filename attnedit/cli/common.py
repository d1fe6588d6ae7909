"""What subcommands share: the flags that are not settings, each defined once (MODEL, --teacher, --device,
--dtype, --json, --save, --out, --overwrite, --set), and the settings' flags from their dataclasses
(:func:`attnedit.schema.add_flags`)."""

from __future__ import annotations

import argparse
import sys

import torch

from ..devices import DTYPES, resolve_device, run_dtype
from ..errors import AttnEditError

RUN_AUTO = "bfloat16 on CUDA, float32 on CPU"
TEACHER = "Hugging Face id, folder, .gguf or smollm2-135m"


def parse_sets(items: list[str] | None) -> dict:
    """``['a=1', 'b.c=x']`` -> ``{'a': '1', 'b.c': 'x'}``; values stay strings, typed later by the schema."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise AttnEditError(f"--set {item!r}: expected key=value, e.g. --set kv_lora_rank=128")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def add_model(p: argparse.ArgumentParser, help: str = "edited checkpoint folder (from attnedit edit or convert)", many: str = "") -> None:
    """The positional MODEL; with ``many`` (what several of them do), MODEL [MODEL ...]."""
    if many:
        p.add_argument("model", nargs="+", help=f"{help}; {many}")
    else:
        p.add_argument("model", help=help)


def add_teacher(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("--teacher", required=True, help=f"the teacher it was edited from ({TEACHER})")
    else:
        p.add_argument("--teacher", help=f"the teacher to compare with, evaluated in the same run ({TEACHER}; default: none)")


def add_device_args(p: argparse.ArgumentParser, auto: str = "the checkpoint's own", what: str = "weights' dtype") -> None:
    """--device and --dtype; ``auto`` says what --dtype auto means for this command."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=sorted({"auto", *DTYPES}), help=f"{what} (auto: {auto})")


def add_json(p: argparse.ArgumentParser, what: str = "print the result as JSON instead of a table") -> None:
    p.add_argument("--json", action="store_true", help=what)


def add_save(p: argparse.ArgumentParser, name: str) -> None:
    """--save FILE (and --overwrite), for commands whose JSON ``attnedit report`` reads from a run folder as ``name``."""
    p.add_argument("--save", metavar="FILE", help=f"also write the JSON to FILE (e.g. RUN/{name}, read by attnedit report)")
    p.add_argument("--overwrite", action="store_true", help="replace --save FILE if it exists")


def check_save(args, *paths, inputs: tuple = ()) -> None:
    """Refuse, before any model is loaded, --save paths that cannot be written, exist (without --overwrite),
    or are one of ``inputs``' files (default: MODEL and --teacher)."""
    from ..io import check_output

    models = args.model if isinstance(args.model, list) else [args.model]
    for path in paths or [args.save]:
        if path:
            check_output(path, "--save", folder=False, overwrite=args.overwrite, inputs=inputs or (*models, args.teacher))


def save_results(path, record, printed_json: bool) -> None:
    """Write ``record`` (an :mod:`attnedit.results` record) to --save ``path`` once the results have been
    printed. When the write fails nothing measured is lost: the JSON is printed too (unless it already was),
    then one line says what went wrong."""
    import json

    try:
        record.write(path)
    except AttnEditError as e:
        if not printed_json:
            print(json.dumps(record.to_dict(), indent=2))
        raise AttnEditError(f"{e}; the results are printed above as JSON") from None


def add_out(p: argparse.ArgumentParser, help: str, required: bool = True, metavar: str | None = None) -> None:
    p.add_argument("--out", required=required, metavar=metavar, help=help)


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def add_set(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"{help} (repeatable)")


def device_of(args) -> torch.device:
    return resolve_device(args.device)


def dtype_of(args, device: torch.device) -> str:
    """--dtype for commands that run models side by side: auto = bfloat16 on CUDA, float32 elsewhere."""
    return run_dtype(args.dtype, device)


def load_dtype(name: str):
    """--dtype for commands that load one checkpoint: auto = the checkpoint's own."""
    return "auto" if name == "auto" else DTYPES[name]


def log(line: str) -> None:
    """Progress lines go to stderr, so that --json output on stdout stays clean."""
    print(line, file=sys.stderr, flush=True)
