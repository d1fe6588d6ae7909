"""Devices and dtypes: the one place that turns ``auto`` into a device, a dtype or a precision."""

from __future__ import annotations

import torch

from .errors import AttnEditError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` (or None): the GPU if one is visible, else the CPU; anything else must exist here."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AttnEditError(f"device={name} but no CUDA GPU is visible; use cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise AttnEditError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def use_bf16(device: torch.device, precision: str) -> bool:
    """A stage's ``precision``: bf16, fp32, or auto = bf16 autocast on a GPU that supports it (a plan for a
    GPU made on a machine without one assumes a bf16 GPU: A100, H100, H200)."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.type == "cuda" and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported())


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device, precision))


def run_dtype(name: str, device: torch.device) -> str:
    """The weights' dtype of an eval/bench run: ``auto`` = bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if name not in DTYPES:
        raise AttnEditError(f"dtype={name!r}: choose auto, {', '.join(DTYPES)}")
    return name
