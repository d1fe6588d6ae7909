"""Clocks and byte counts of the bench: marks on the device's timeline (CUDA events on a GPU, the wall clock
elsewhere), peak device memory, the weights' bytes, the measured copy bandwidth and the bytes a decode step must
read at least (its HBM bound)."""

from __future__ import annotations

import time

import torch

from ..kv import analytic_cache_bytes


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, the wall clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (waits for the GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _distinct_bytes(tensors) -> int:
    """Bytes of ``tensors``, each storage counted once (tied or shared weights)."""
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _tensor_bytes(model) -> int:
    return _distinct_bytes([*model.parameters(), *model.buffers()])


def routing(config) -> tuple[int, int] | None:
    """A mixture-of-experts config's (routed experts a layer, experts a token), or None for a dense model; an edited
    model's config answers for the teacher's it keeps (``base_config``)."""
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    fields = {**(fields.get("base_config") or {}), **fields}
    experts = fields.get("num_experts") or fields.get("num_local_experts") or fields.get("n_routed_experts")
    per_token = fields.get("num_experts_per_tok")
    return (int(experts), int(per_token)) if experts and per_token else None


def experts_read(experts: int, per_token: int, tokens: int) -> float:
    """How many of a layer's ``experts`` a step of ``tokens`` tokens reads on average, each token routed to
    ``per_token`` of them uniformly: ``experts * (1 - (1 - per_token / experts) ** tokens)``, exactly
    ``per_token`` for one token and all of them as ``tokens`` grows."""
    return experts * (1 - (1 - per_token / experts) ** tokens)


def _routed_expert_bytes(model) -> int:
    """Bytes of the routed experts' weights (each MoE block's ``experts``; shared experts are not routed)."""
    experts = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "experts"]
    return _distinct_bytes([t for m in experts for t in m.parameters()])


def _folded(model) -> tuple[int, int]:
    return model.folded_bytes() if hasattr(model, "folded_bytes") else (0, 0)


def weight_bytes(model) -> int:
    """Bytes of the distinct weights the model holds (tied embeddings counted once; MLA's folded decode weights,
    where folded, included)."""
    return _tensor_bytes(model) + _folded(model)[0]


def step_weight_bytes(model, tokens: int | None = None) -> int:
    """Bytes of weights a decode step of ``tokens`` tokens (one a sequence) reads at least: every distinct weight
    once, MLA's folded copies in place of the projections they stand in for; of a mixture of experts' routed
    experts only those the step's tokens reach on average (:func:`experts_read`: 8 of Qwen3-30B-A3B's 128 at batch 1,
    126 at batch 64). ``tokens=None`` counts every expert."""
    total = _tensor_bytes(model) + _folded(model)[1]
    route = routing(getattr(model, "config", None))
    if route is None or tokens is None:
        return total
    routed = _routed_expert_bytes(model)
    return total - routed + round(routed * experts_read(*route, tokens) / route[0])


def copy_bandwidth(device: torch.device) -> float | None:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + written), None on CPU."""
    if device.type != "cuda":
        return None
    n = 1 << 28  # 512 MiB of bf16 each way
    a = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    clock = Clock(device)
    clock.mark()
    for _ in range(10):
        b.copy_(a)
    clock.mark()
    ms = clock.intervals_ms()[0] / 10
    del a, b
    return 2 * n * 2 / (ms / 1e3)


def bytes_per_step(model, config, batch: int, context: int, dtype: str) -> int:
    """What one decode step must read at least: every weight once (of a mixture of experts, the experts ``batch``
    tokens reach), and the KV of ``context`` tokens."""
    return step_weight_bytes(model, batch) + analytic_cache_bytes(config, context, batch, dtype)


def peak_start(device) -> int:
    """Reset the device's peak-memory count; the bytes allocated now (0 on CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_bytes(device, before: int, model) -> int | None:
    """The peak device memory since :func:`peak_start` returned ``before``, with ``model``'s weights (None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) - before + weight_bytes(model)
