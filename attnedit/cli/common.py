"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse

import torch

from ..errors import AttnEditError

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_sets(items: list[str] | None) -> dict:
    """``['a=1', 'b.c=x']`` -> ``{'a': '1', 'b.c': 'x'}``; values stay strings, typed later by the schema."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise AttnEditError(f"--set {item!r}: expected key=value, e.g. --set kv_lora_rank=128")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def add_device_args(p: argparse.ArgumentParser, dtype_default: str = "auto") -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype", default=dtype_default, choices=sorted(DTYPES),
        help=f"weights' dtype; auto = the checkpoint's own (default {dtype_default})",
    )


def device_of(args) -> torch.device:
    if args.device:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise AttnEditError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
