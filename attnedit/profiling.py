"""Where device time goes: a few calls of a step under ``torch.profiler``, summed by kernel family.

``attnedit bench --profile`` profiles decode steps and a prefill; ``profile_steps`` in a recipe profiles
training steps of each stage next to the teacher's plain forward at the same batch shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def kernel_kind(name: str) -> str:
    """A CUDA kernel's family, for the profile's summary."""
    n = name.lower()
    for kind, keys in (
        ("attention", ("flash", "attention", "fmha", "sdpa", "_decode_")),
        ("gemm", ("gemm", "cutlass", "cublas", "sm90_xmma", "nvjet", "matmul", "splitk")),
        ("copy", ("memcpy", "memset", "copy", "index_copy", "scatter")),
        ("fused (triton)", ("triton",)),
    ):
        if any(k in n for k in keys):
            return kind
    return "other"


def profile_steps(step: Callable[[], object], steps: int, device: torch.device) -> dict:
    """``steps`` calls of ``step`` under ``torch.profiler``: device kernels (CPU ops without a GPU) per step,
    device time per step, and the time by kernel family and by the ten costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for e in prof.key_averages():
        us = (e.self_device_time_total if cuda else e.self_cpu_time_total) or 0
        if us <= 0 or (cuda and e.device_type != torch.autograd.DeviceType.CUDA):
            continue
        rows.append((e.key, us / 1e3 / steps, e.count / steps))
    rows.sort(key=lambda r: -r[1])
    kinds: dict[str, list[float]] = {}
    for name, ms, n in rows:
        k = kinds.setdefault(kernel_kind(name), [0.0, 0.0])
        k[0] += ms
        k[1] += n
    return {
        "what": "CUDA kernels" if cuda else "CPU ops (no GPU)",
        "kernels_per_step": round(sum(r[2] for r in rows), 1),
        "device_ms_per_step": round(sum(r[1] for r in rows), 4),
        "by_kind": {k: {"ms_per_step": round(v[0], 4), "per_step": round(v[1], 1)} for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
        "top": [{"kernel": name[:120], "ms_per_step": round(ms, 4), "per_step": round(n, 1)} for name, ms, n in rows[:10]],
    }
