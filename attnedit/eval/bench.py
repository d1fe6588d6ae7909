"""Efficiency next to the teacher: KV bytes, peak memory, time to first token and decode speed.

For every (batch, context) both models, loaded in the same process, prefill ``context`` random tokens
and then decode ``decode_tokens`` more greedily, each through its own real cache: the student through
``AttnEditCache`` (MLA latent cache, sliding-window ring buffers), the teacher through transformers'
``DynamicCache``. Figures per model and cell:

- ``ttft_ms``: time to first token, i.e. the prefill plus the choice of the first token;
- ``decode_tok_s``: ``batch * decode_tokens`` over the time of the decode steps that follow;
- ``kv_bytes_measured``: bytes of storage the cache tensors hold right after the prefill (all
  ``batch`` sequences at ``context`` tokens); ``kv_bytes_analytic``: the same from the config alone
  (:mod:`attnedit.eval.kv`); a test checks that they are equal;
- ``peak_mem_bytes``: what one generation needs at its peak: the model's weights plus the most
  memory allocated above what was already there (``torch.cuda.max_memory_allocated``), so the other
  model resident in the same process is not counted; null on CPU, where torch keeps no such counter.

On CUDA the times come from CUDA events (no host synchronisation inside the timed region), after
``warmup`` untimed runs, as medians over ``repeats`` runs. On CPU the wall clock is used; CPU
figures show that the code runs, not how fast a GPU would be.

A cell that does not fit in memory (``torch.OutOfMemoryError``) is recorded as null, together with
the largest batch that does fit at that context (searched downward), and the table goes on.
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import AttnEditError, is_out_of_memory
from .kv import kv_summary

MODELS = ("student", "teacher")
FIGURES = ("ttft_ms", "decode_tok_s", "peak_mem_bytes", "kv_bytes_measured", "kv_bytes_analytic")


@dataclass
class BenchSettings:
    """What to measure. ``decode_tokens`` are generated after the first token."""

    contexts: list[int]
    batches: list[int]
    decode_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    seed: int = 0

    def __post_init__(self):
        for name in ("contexts", "batches"):
            values = getattr(self, name)
            if not values or any(int(v) < 1 for v in values):
                raise AttnEditError(f"--{name} needs positive integers, e.g. --{name} 1024,4096")
        if self.decode_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise AttnEditError("--decode-tokens and --repeats must be at least 1, --warmup at least 0")


# ---------------------------------------------------------------------------------------------- caches


def new_cache(model):
    """The model's own cache: attnedit's for edited models, a transformers ``DynamicCache`` otherwise."""
    if hasattr(model, "new_cache"):
        return model.new_cache()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_bytes(cache) -> int:
    """Bytes of storage that a cache's tensors hold (attnedit caches count their own)."""
    if hasattr(cache, "allocated_bytes"):
        return cache.allocated_bytes()
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.untyped_storage().nbytes()
    return total


def analytic_cache_bytes(config, context: int, batch: int, dtype: str) -> int:
    """What the cache of ``batch`` sequences of ``context`` tokens should hold, from the config alone."""
    return round(kv_summary(config, context, dtype)["kv_bytes_per_token"] * context) * batch


def _cache_kwarg(model) -> str:
    # transformers renamed the forward's `past_key_values` to `cache` in 5.2x; attnedit models take both
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def max_context(config) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), if it says."""
    base = getattr(config, "base_config", None)
    if isinstance(base, dict) and base.get("max_position_embeddings"):
        return int(base["max_position_embeddings"])
    return getattr(config, "max_position_embeddings", None)


def check_contexts(config, contexts: list[int], name: str) -> None:
    limit = max_context(config)
    too_long = [c for c in contexts if limit and c > limit]
    if too_long:
        raise AttnEditError(
            f"context {max(too_long)} is longer than {name} supports ({limit} tokens); use shorter --contexts"
        )


# ----------------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_greedy(model, ids: torch.Tensor, new_tokens: int, on_first: Callable | None = None) -> torch.Tensor:
    """Prefill ``ids`` and decode ``new_tokens`` tokens greedily, one at a time, with the model's real cache.

    ``on_first(cache)`` is called once the first token is chosen (the end of the prefill). Nothing here
    waits for the device, so CUDA events around it time the GPU work, not Python.
    """
    cache = new_cache(model)
    kw = {_cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    token = model(input_ids=ids, **kw).logits[:, -1].argmax(-1, keepdim=True)
    if on_first is not None:
        on_first(cache)
    out = [token]
    for _ in range(new_tokens - 1):
        token = model(input_ids=token, **kw).logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)


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


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def run_once(model, batch: int, context: int, decode_tokens: int, seed: int = 0) -> dict:
    """One timed generation: prefill ``context`` random tokens for ``batch`` sequences, then decode."""
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=g).to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    clock, kv = Clock(device), []
    clock.mark()
    generate_greedy(model, ids, decode_tokens + 1, on_first=lambda cache: (clock.mark(), kv.append(cache_bytes(cache))))
    clock.mark()
    prefill_ms, decode_ms = clock.intervals_ms()
    return {
        "ttft_ms": prefill_ms,
        "decode_tok_s": batch * decode_tokens / (decode_ms / 1e3),
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) - before + weight_bytes(model) if cuda else None,
        "kv_bytes_measured": kv[0],
    }


def measure(model, batch: int, context: int, settings: BenchSettings) -> dict:
    """Medians over ``repeats`` timed runs after ``warmup`` untimed ones (raises OutOfMemoryError)."""
    for _ in range(settings.warmup):
        run_once(model, batch, context, settings.decode_tokens, settings.seed)
    runs = [run_once(model, batch, context, settings.decode_tokens, settings.seed) for _ in range(settings.repeats)]
    peaks = [r["peak_mem_bytes"] for r in runs if r["peak_mem_bytes"] is not None]
    return {
        "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        "peak_mem_bytes": max(peaks) if peaks else None,
        "kv_bytes_measured": runs[0]["kv_bytes_measured"],
    }


# ---------------------------------------------------------------------------------- out of memory


def release_memory() -> None:
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


# ---------------------------------------------------------------------------------------- the table


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def ratios(student: dict | None, teacher: dict | None) -> dict:
    if student is None or teacher is None:
        return {k: None for k in FIGURES}
    return {k: _ratio(student.get(k), teacher.get(k)) for k in FIGURES}


def check_pair(student, teacher) -> None:
    """Refuse a teacher that is not the one the student was edited from (the comparison would mislead)."""
    base = getattr(student.config, "base_config", None)
    if not isinstance(base, dict):
        raise AttnEditError(
            "the model to bench is not an edited (attnedit) checkpoint; give the output of attnedit edit/convert"
        )
    t = teacher.config
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if base.get(key) != getattr(t, key, None):
            raise AttnEditError(
                f"--teacher does not match the model: {key} {getattr(t, key, None)} vs {base.get(key)}; give the teacher it was edited from"
            )


def kv_by_context(config, contexts: list[int], dtype: str) -> dict:
    return {
        "contexts": list(contexts),
        "bytes_per_token": [kv_summary(config, c, dtype)["kv_bytes_per_token"] for c in contexts],
    }


def run_bench(student, teacher, settings: BenchSettings, dtype: str, log: Callable[[str], None] = print) -> dict:
    """Every (batch, context) cell for both models, as ``bench.json``::

        {"device", "dtype", "decode_tokens", "repeats", "timing",
         "kv": {"student"|"teacher": {"contexts": [...], "bytes_per_token": [...]}, "ratio": [...]},
         "runs": [{"batch", "context", "student": {FIGURES} | null, "teacher": {...} | null,
                   "ratio": {figure: student / teacher | null}, "largest_batch": {model: int} (when one did not fit)}]}
    """
    check_pair(student, teacher)
    models = {"student": student, "teacher": teacher}
    for name, model in models.items():
        check_contexts(model.config, settings.contexts, f"the {name}")
    device = next(student.parameters()).device
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype,
        "decode_tokens": settings.decode_tokens,
        "repeats": settings.repeats,
        "timing": "CUDA events, medians" if device.type == "cuda" else "wall clock, medians",
        "kv": {name: kv_by_context(m.config, settings.contexts, dtype) for name, m in models.items()},
        "runs": [],
    }
    result["kv"]["ratio"] = [
        _ratio(s, t)
        for s, t in zip(result["kv"]["student"]["bytes_per_token"], result["kv"]["teacher"]["bytes_per_token"])
    ]
    limits: dict[tuple[str, int], tuple[int, int]] = {}  # (model, context) -> (largest fit, smallest failure)
    for context in settings.contexts:
        for batch in settings.batches:
            run = {"batch": batch, "context": context}
            for name, model in models.items():
                figures = _cell(model, batch, context, settings, limits.get((name, context)))
                if isinstance(figures, int):  # did not fit: the largest batch that does
                    limits[(name, context)] = (figures, min(batch, limits.get((name, context), (0, batch))[1]))
                    run.setdefault("largest_batch", {})[name] = figures
                    log(
                        f"{name}: batch {batch} at context {context} does not fit in memory; the largest that fits is {figures}"
                    )
                    figures = None
                else:
                    figures["kv_bytes_analytic"] = analytic_cache_bytes(model.config, context, batch, dtype)
                run[name] = figures
            run["ratio"] = ratios(run["student"], run["teacher"])
            result["runs"].append(run)
            log(_progress(run))
    return result


def _cell(model, batch: int, context: int, settings: BenchSettings, known: tuple[int, int] | None) -> dict | int:
    """The figures of one cell, or (when it does not fit) the largest batch that fits at this context.

    ``known`` is (largest fit, smallest failure) from an earlier batch at the same context, if any.
    """
    if known and batch >= known[1]:
        return known[0]
    figures = fits(lambda: measure(model, batch, context, settings))
    if figures is not None:
        return figures

    def ok(b: int) -> bool:
        return fits(lambda: run_once(model, b, context, settings.decode_tokens, settings.seed)) is not None

    return largest_fit(ok, batch)


def _progress(run: dict) -> str:
    parts = [f"batch {run['batch']:>4} context {run['context']:>6}"]
    for name in MODELS:
        f = run[name]
        parts.append(
            f"{name} "
            + ("out of memory" if f is None else f"ttft {f['ttft_ms']:.1f} ms, {f['decode_tok_s']:.1f} tok/s")
        )
    return " | ".join(parts)


def format_bench(result: dict) -> str:
    """The compact table printed at the end of ``attnedit bench``."""
    from ..tables import human_bytes, text_table

    def get(run, name, key):
        f = run.get(name)
        return None if f is None else f.get(key)

    def num(v, fmt):
        return "-" if v is None else fmt.format(v)

    def size(v):
        return "-" if v is None else human_bytes(v)

    show_peak = any(get(r, n, "peak_mem_bytes") is not None for r in result["runs"] for n in MODELS)
    headers = [
        "batch",
        "context",
        "TTFT ms S",
        "TTFT ms T",
        "S/T",
        "decode tok/s S",
        "decode tok/s T",
        "S/T",
        "KV S",
        "KV T",
        "S/T",
    ]
    if show_peak:
        headers += ["peak S", "peak T"]
    rows = []
    for r in result["runs"]:
        ratio = r["ratio"]
        row = [
            r["batch"],
            r["context"],
            num(get(r, "student", "ttft_ms"), "{:,.1f}"),
            num(get(r, "teacher", "ttft_ms"), "{:,.1f}"),
            num(ratio["ttft_ms"], "{:.2f}"),
            num(get(r, "student", "decode_tok_s"), "{:,.0f}"),
            num(get(r, "teacher", "decode_tok_s"), "{:,.0f}"),
            num(ratio["decode_tok_s"], "{:.2f}"),
            size(get(r, "student", "kv_bytes_measured")),
            size(get(r, "teacher", "kv_bytes_measured")),
            num(ratio["kv_bytes_measured"], "{:.3f}"),
        ]
        if show_peak:
            row += [size(get(r, "student", "peak_mem_bytes")), size(get(r, "teacher", "peak_mem_bytes"))]
        rows.append(row)
    kv = result["kv"]
    lines = [
        (
            f"device {result['device']}, {result['dtype']}, {result['decode_tokens']} decode tokens, {result['timing']} of "
            f"{result['repeats']}; S = student, T = teacher; KV = cache bytes after the prefill (whole batch)"
        ),
        text_table(headers, rows, right=set(range(len(headers)))),
        "",
        "KV bytes per token: "
        + ", ".join(
            f"{c}: {human_bytes(s)} vs {human_bytes(t)} ({s / t:.1%})"
            for c, s, t in zip(
                kv["student"]["contexts"], kv["student"]["bytes_per_token"], kv["teacher"]["bytes_per_token"]
            )
        ),
    ]
    for r in result["runs"]:
        for name, best in r.get("largest_batch", {}).items():
            lines.append(
                f"{name}: batch {r['batch']} at context {r['context']} does not fit; largest that fits: {best}"
            )
    return "\n".join(lines)
