"""Serving capacity: the largest batch each engine serves at a context on this device, and its decode
throughput there, next to the KV-only limit ``(memory - weights) / cache bytes per sequence``.

A server allocates the caches of the sequences it serves together and prefills each request on its own, so
a batch fits when its caches, the weights and one request's prefill working set fit at once. The search
measures exactly that, on attnedit's engine (``generate()``'s): a static cache for ``B`` sequences of the
context (plus the decoded tokens), one sequence prefilled through the model's chunked prefill (at most
``model.prefill_chunk`` tokens at once; every further sequence's prefill reuses the same bounded working set),
its cache copied into the other rows (so every row holds a full context), then decode steps at batch ``B``:
eager steps while searching, CUDA-graph steps timed at the largest batch found. While one engine is measured,
the weights that belong only to the other models of the run wait in host memory, so each engine has the
device to itself, as it would in production.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import contextmanager

import torch

from .kv import analytic_cache_bytes


def kv_only_limit(memory_bytes: int, weight_bytes: int, cache_bytes_per_sequence: int) -> int:
    """How many sequences' caches the memory left by the weights would hold, if nothing else needed memory."""
    if cache_bytes_per_sequence <= 0:
        return 0
    return max(0, (memory_bytes - weight_bytes) // cache_bytes_per_sequence)


def largest_batch(ok: Callable[[int], bool], upper: int) -> int:
    """The largest batch in ``1..upper`` for which ``ok`` holds (``ok`` true up to some batch, false above):
    ``upper`` first (often the answer for small caches), then bisection; 0 when not even 1 fits."""
    if upper < 1:
        return 0
    if ok(upper):
        return upper
    lo, hi = 0, upper
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _tensors(model) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def tensors_to_move(model, others: list, on_device=lambda t: t.is_cuda) -> list[torch.Tensor]:
    """The parameters and buffers of ``others`` on the device that ``model`` does not share, each once."""
    keep = {t.data_ptr() for t in _tensors(model)}
    out, seen = [], set()
    for t in itertools.chain.from_iterable(_tensors(m) for m in others):
        if on_device(t) and id(t) not in seen and t.data_ptr() not in keep:
            seen.add(id(t))
            out.append(t)
    return out


@contextmanager
def resident_alone(model, others: list):
    """Move :func:`tensors_to_move` to host memory for the duration (and back), so that ``model`` has the device
    to itself. Fused projections must be off for the moved models (their fused weight would keep the memory)."""
    moved = [(t, t.device) for t in tensors_to_move(model, others)]
    for t, _ in moved:
        t.data = t.data.to("cpu")
    _release()
    try:
        yield
    finally:
        for t, device in moved:
            t.data = t.data.to(device)


def _release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def fill_rows_from_first(cache) -> None:
    """Give every row of a static cache the contents and token count of row 0 (after row 0's prefill)."""
    for layer in cache.layers:
        for t in layer.tensors():
            t[1:].copy_(t[:1].expand_as(t[1:]))
    cache.real[1:] = cache.real[0]
    cache.n_cached_device.copy_(cache.real[0])


def capacity_cell(engine, context: int, settings, memory_bytes: int, dtype: str, weight_bytes: int, ok=None) -> dict:
    """The largest batch ``engine`` (an :class:`~attnedit.eval.bench.AttnEditEngine`) serves at ``context`` within
    ``memory_bytes``, and its decode figures at that batch. ``ok(b)`` decides whether a batch fits (default: the
    engine's real probe, false on running out of memory)."""
    from .bench import fits

    model = engine.model
    length = engine.cache_length(context, settings)
    per_seq = analytic_cache_bytes(model.config, length, 1, dtype)
    limit = kv_only_limit(memory_bytes, weight_bytes, per_seq)
    if ok is None:

        def ok(b: int) -> bool:
            return fits(lambda: engine.probe(b, context, settings)) is not None

    best = largest_batch(ok, limit)
    figures = None
    while best > 0:  # the timed (CUDA-graph) run may need a little more than the eager probe
        figures = fits(lambda: engine.serve(best, context, settings))
        if figures is not None:
            break
        best = largest_batch(lambda b: b < best and ok(b), best - 1)
    return {
        "context": context,
        "largest_batch": best,
        "kv_only_limit": limit,
        "cache_bytes_per_sequence": per_seq,
        "kv_tokens": length,
        "weight_bytes": weight_bytes,
        "memory_bytes": memory_bytes,
        **({k: figures[k] for k in ("step_ms", "decode_tok_s", "peak_mem_bytes")} if figures else {"step_ms": None, "decode_tok_s": None, "peak_mem_bytes": None}),
    }


def capacity_ratios(student: dict, teacher: dict) -> dict:
    """The student's largest batch and throughput there over the teacher's, each at its own largest batch."""

    def ratio(a, b):
        return a / b if a is not None and b else None

    return {
        "largest_batch": ratio(student["largest_batch"], teacher["largest_batch"]),
        "decode_tok_s": ratio(student["decode_tok_s"], teacher["decode_tok_s"]),
        "kv_only_limit": ratio(student["kv_only_limit"], teacher["kv_only_limit"]),
    }
