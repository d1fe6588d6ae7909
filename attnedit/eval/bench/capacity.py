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

The searches run a measurement and count running out of device memory (``torch.OutOfMemoryError``, or a CPU
allocation failure) as not fitting (:func:`fits`): :func:`largest_batch` from the KV-only limit down, and
:func:`largest_fit` below a batch of the timing grid that did not fit.
"""

from __future__ import annotations

import gc
import itertools
import traceback
from collections.abc import Callable
from contextlib import contextmanager

import torch

from ...errors import AttnEditError, is_out_of_memory
from ..kv import analytic_cache_bytes
from .engines import AttnEditEngine, set_engine_options
from .settings import BenchSettings
from .timing import bytes_per_step, weight_bytes


def release_memory() -> None:
    """Collect garbage and hand the device's cached memory back (between models, after running out of it)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fits(fn: Callable[[], object]) -> object | None:
    """``fn()``, or None when it runs out of device memory (memory is released before returning)."""
    try:
        return fn()
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:  # CPU allocators raise RuntimeError
        if not is_out_of_memory(e):
            raise
    release_memory()  # outside the except block, so the traceback's tensors are already freed
    return None


def largest_fit(ok: Callable[[int], bool], failed: int) -> int:
    """The largest batch below ``failed`` for which ``ok`` holds: halve until one fits, then bisect; 0 if none."""
    hi, b = failed, failed // 2
    while b > 0 and not ok(b):
        hi, b = b, b // 2
    lo = b
    while lo and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


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
    release_memory()
    try:
        yield
    except BaseException as e:
        # the failed measurement's frames still hold its device tensors: free them, or moving back runs out
        traceback.clear_frames(e.__traceback__)
        release_memory()
        raise
    finally:
        for t, device in moved:
            t.data = t.data.to(device)


def capacity_cell(engine, context: int, settings, memory_bytes: int, dtype: str, weight_bytes: int, ok=None, bandwidth: float | None = None) -> dict:
    """The largest batch ``engine`` (an :class:`~.engines.AttnEditEngine`) serves at ``context`` within
    ``memory_bytes``, and its decode figures at that batch: the step, the throughput, the peak memory and, given
    the device's copy ``bandwidth`` (bytes/s), the step over its HBM bound (every weight and the batch's KV of
    ``context`` tokens read once, as in the timed runs). ``ok(b)`` decides whether a batch fits (default: the
    engine's real probe, false on running out of memory)."""
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
    bound_ms = bytes_per_step(model, model.config, best, context, dtype) / bandwidth * 1e3 if figures and bandwidth else None
    return {
        "context": context,
        "largest_batch": best,
        "kv_only_limit": limit,
        "cache_bytes_per_sequence": per_seq,
        "kv_tokens": length,
        "weight_bytes": weight_bytes,
        "memory_bytes": memory_bytes,
        **(
            {k: figures[k] for k in ("step_ms", "decode_tok_s", "peak_mem_bytes")}
            if figures
            else {"step_ms": None, "decode_tok_s": None, "peak_mem_bytes": None}
        ),
        "hbm_bound_ms": bound_ms,
        "step_over_bound": figures["step_ms"] / bound_ms if bound_ms else None,
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


def measure_capacity(engines: dict, settings: BenchSettings, dtype: str, device, log, bandwidth: float | None = None) -> dict:
    """{(engine, context): capacity cell} for the engines on attnedit's engine, each measured with the device to
    itself; ``bandwidth`` (the run's measured copy bandwidth) gives each cell its step over the HBM bound."""
    if device.type == "cuda":
        memory = int(settings.memory_gb * 2**30) if settings.memory_gb else torch.cuda.mem_get_info(device)[1]
    elif settings.memory_gb:
        memory = int(settings.memory_gb * 2**30)
    else:
        raise AttnEditError("--capacity on a CPU needs --memory-gb (the memory to fill); on a GPU it is the card's")
    ours = {name: e for name, e in engines.items() if isinstance(e, AttnEditEngine)}
    models = [e.model for e in engines.values()]
    out = {}
    set_engine_options(ours, False, False)  # a fused or folded weight would keep a moved model's device memory
    for name, engine in ours.items():
        set_engine_options({name: engine}, settings.fuse_projections, settings.compile_prefill, settings.fold_absorbed)
        if engine.compile:
            torch._dynamo.reset()
        weights = weight_bytes(engine.model)
        with resident_alone(engine.model, [m for m in models if m is not engine.model]):
            for context in settings.contexts:
                cell = capacity_cell(engine, context, settings, memory, dtype, weights, bandwidth=bandwidth)
                out[(name, context)] = cell
                log(
                    f"{name}: at context {context} serves {cell['largest_batch']} sequences (KV-only limit "
                    f"{cell['kv_only_limit']})"
                    + (f", {cell['decode_tok_s']:,.0f} tok/s" if cell["decode_tok_s"] else "")
                    + (f", step {cell['step_over_bound']:.2f}x its HBM bound" if cell["step_over_bound"] else "")
                )
        set_engine_options({name: engine}, False, False)
    return out


def capacity_rows(label: str, contexts: list[int], capacity: dict) -> list[dict]:
    """``bench.json``'s ``capacity``: per context the student's and the teacher's cells and their ratios."""
    rows = []
    for context in contexts:
        student, teacher = capacity.get((label, context)), capacity.get(("teacher", context))
        row = {"context": context, "student": student, "teacher": teacher}
        row["ratio"] = capacity_ratios(student, teacher) if student and teacher else None
        rows.append(row)
    return rows
