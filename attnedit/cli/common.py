"""Argument helpers shared by subcommands: one definition of --set, --device and --dtype."""

from __future__ import annotations

import argparse

import torch

from ..devices import DTYPES, resolve_device, run_dtype
from ..errors import AttnEditError

RUN_AUTO = "bfloat16 on CUDA, float32 on CPU"


def parse_sets(items: list[str] | None) -> dict:
    """``['a=1', 'b.c=x']`` -> ``{'a': '1', 'b.c': 'x'}``; values stay strings, typed later by the schema."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise AttnEditError(f"--set {item!r}: expected key=value, e.g. --set kv_lora_rank=128")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def add_device_args(p: argparse.ArgumentParser, auto: str = "the checkpoint's own", what: str = "weights' dtype") -> None:
    """--device and --dtype; ``auto`` says what --dtype auto means for this command."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=sorted({"auto", *DTYPES}), help=f"{what} (auto: {auto})")


def device_of(args) -> torch.device:
    return resolve_device(args.device)


def dtype_of(args, device: torch.device) -> str:
    """--dtype for commands that run models side by side: auto = bfloat16 on CUDA, float32 elsewhere."""
    return run_dtype(args.dtype, device)


def load_dtype(name: str):
    """--dtype for commands that load one checkpoint: auto = the checkpoint's own."""
    return "auto" if name == "auto" else DTYPES[name]
