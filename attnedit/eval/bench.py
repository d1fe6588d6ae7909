"""Efficiency next to the teacher: KV bytes, peak memory, time to first token and decode speed.

Three engines per (batch, context), each in the same process and run:

- ``student``: the edited model on attnedit's engine: a static cache allocated once for the whole
  generation (MLA latent, sliding-window rings, full K/V), an eager prefill (flash / sliding-window
  kernels), then a one-token decode step compiled with ``torch.compile(mode="reduce-overhead")``
  (CUDA graphs) on a GPU - what ``generate()`` runs;
- ``teacher``: the teacher on the *same* engine (an attnedit model whose every layer is the teacher's
  own attention, sharing its weights), so the ratio isolates the attention;
- ``teacher_stock``: the teacher's best stock path, ``transformers`` ``generate(...,
  cache_implementation="static")`` with its automatic ``torch.compile`` - what a user would otherwise
  run. Its TTFT is a 1-token generate; its decode rate comes from the extra time of ``decode_tokens``
  more tokens.

Figures per engine and cell: ``ttft_ms`` (prefill + first token), ``step_ms`` and ``decode_tok_s``
(decode steps after warm-up, CUDA events), ``bytes_per_step`` (weights + the KV the step must read),
``hbm_bound_ms`` (those bytes at the measured device-to-device copy bandwidth) and ``step_over_bound``,
``kv_bytes_measured`` (what the static cache allocates, for ``kv_tokens`` = context + decoded tokens)
next to ``kv_bytes_analytic`` (the same from the config alone), ``peak_mem_bytes`` and
``compile_s`` (first-step compile time, excluded from every other figure). On CPU there is no
compile and the wall clock is used: CPU figures show that the code runs, not how fast a GPU would be.

A cell that does not fit in memory (``torch.OutOfMemoryError``, or a CPU allocation failure) is recorded
as null, with the largest batch that fits at that context (searched downward).
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import AttnEditError, is_out_of_memory
from ..profiling import kernel_kind, profile_steps  # noqa: F401 - kernel_kind re-exported for callers of bench
from ..results import Bench
from ..schema import FieldError, require, setting
from .kv import analytic_cache_bytes, kv_by_context, max_context

FIGURES = (
    "ttft_ms",
    "step_ms",
    "decode_tok_s",
    "hbm_bound_ms",
    "step_over_bound",
    "peak_mem_bytes",
    "kv_bytes_measured",
    "kv_bytes_analytic",
)


@dataclass
class BenchSettings:
    """What to measure (``attnedit bench``'s flags, the recipe's ``eval.bench:``). ``decode_tokens`` are
    generated after the first token."""

    contexts: list[int] = setting([1024, 4096, 8192], "prompt lengths in tokens")
    batches: list[int] = setting([1, 16, 64], "batch sizes")
    decode_tokens: int = setting(32, "tokens decoded after the first one")
    repeats: int = setting(3, "timed runs per cell; the median is reported")
    warmup: int = setting(1, "untimed runs per cell before timing")
    seed: int = setting(0, "seed of the random prompts")
    stock: bool = setting(True, "also time the teacher on stock transformers: static cache and automatic torch.compile")
    stock_cells: list[tuple[int, int]] | None = setting(
        None, "time the stock path only at these BATCHxCONTEXT cells of the grid, e.g. 1x8192,64x8192 (it compiles "
        "once per shape, about 2 minutes each on an H100; default: every cell)", metavar="BxC[,BxC...]",
    )  # fmt: skip
    compile: bool | None = setting(None, "decode through torch.compile + CUDA graphs, else eagerly (default: on CUDA only)")
    fuse_projections: bool = setting(
        False, "run the student's and the same-engine teacher's input projections as one GEMM each (q/k/v and the gate; "
        "an MLP's gate/up): model.fuse_projections(), fewer kernels per decode step",
    )  # fmt: skip
    compile_prefill: bool = setting(
        False, "also compile the prefill's element-wise work (model.compile_prefill(): norms, MLP activation, residuals; "
        "dynamic shapes) for the student and the teacher on attnedit's engine; the stock path's prefill stays eager, "
        "as transformers runs it",
    )  # fmt: skip
    capacity: bool = setting(
        False, "also find, at every context, the largest batch each model serves on this device (its caches, the "
        "weights and one sequence's chunked prefill in memory at once; the other models' weights moved to host "
        "memory meanwhile) and its decode throughput there, next to the KV-only limit (memory - weights) / cache "
        "bytes per sequence",
    )  # fmt: skip
    memory_gb: float | None = setting(None, "device memory the capacity search fills, in GiB (default: the GPU's total; needed on CPU)")
    profile: bool = setting(
        False, "also profile attnedit's decode steps in every cell (torch.profiler): kernels per step, device time "
        "per step, time by kernel family and the costliest kernels, saved under each engine's 'profile'; and one prefill "
        "(where TTFT goes) under 'prefill_profile'",
    )  # fmt: skip

    def __post_init__(self):
        require(self, [
            (all(v >= 1 for v in self.contexts), "contexts", "needs positive integers, e.g. 1024,4096"),
            (all(v >= 1 for v in self.batches), "batches", "needs positive integers, e.g. 1,16"),
            (self.decode_tokens >= 1, "decode_tokens", "must be at least 1"),
            (self.repeats >= 1, "repeats", "must be at least 1"),
            (self.warmup >= 0, "warmup", "must be 0 or more"),
            (self.memory_gb is None or self.memory_gb > 0, "memory_gb", "must be a positive number of GiB"),
        ])  # fmt: skip
        if self.stock_cells is not None:
            self.stock_cells = [tuple(c) for c in self.stock_cells]
            outside = [c for c in self.stock_cells if c[0] not in self.batches or c[1] not in self.contexts]
            if outside:
                raise FieldError("stock_cells", outside[0], "not in the grid of batches x contexts")


PREFILL_BACKEND = "inductor"  # torch.compile backend of --compile-prefill


# ---------------------------------------------------------------------------------------------- caches


def new_cache(model):
    """The model's own cache: attnedit's for edited models, a transformers ``DynamicCache`` otherwise."""
    if hasattr(model, "new_cache"):
        return model.new_cache()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _cache_kwarg(model) -> str:
    # transformers renamed the forward's `past_key_values` to `cache` in 5.2x; attnedit models take both
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def load_students(models: list[str], teacher: str, contexts: list[int], device: torch.device, dtype: str):
    """``({folder: student}, teacher, tokenizer)``: edited checkpoints and their teacher on ``device`` in
    ``dtype`` (a name), for bench and passkey. Folders that are not edited models, and contexts longer than
    a model supports, fail in one line before any weight is read."""
    from ..devices import DTYPES
    from ..teachers import load_config, load_model

    for model in models:
        config = load_config(model)
        if getattr(config, "model_type", None) != "attnedit":
            raise AttnEditError(f"{model} is not an edited model; give the output folder of attnedit edit or convert")
        check_contexts(config, contexts, "the model")
    check_contexts(load_config(teacher), contexts, "the teacher")
    students, tokenizer = {}, None
    for model in models:
        students[model], tokenizer = load_model(model, dtype=DTYPES[dtype], device=device)
    reference, _ = load_model(teacher, dtype=DTYPES[dtype], device=device)
    return students, reference, tokenizer


def check_contexts(config, contexts: list[int], name: str) -> None:
    limit = max_context(config)
    too_long = [c for c in contexts if limit and c > limit]
    if too_long:
        raise AttnEditError(
            f"context {max(too_long)} is longer than {name} supports ({limit} tokens); use shorter --contexts"
        )


# ----------------------------------------------------------------------------------------- generation


@torch.no_grad()
def next_token(model, ids: torch.Tensor, cache, cache_kw: str | None = None) -> torch.Tensor:
    """Feed ``ids`` through ``cache`` and return the greedy next token of each row, ``[batch, 1]``.
    ``cache_kw`` (the forward's name for the cache) can be given to keep its look-up out of compiled code."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kw or _cache_kwarg(model): cache})
    return out.logits[:, -1].argmax(-1, keepdim=True)


def generate_greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Prefill ``ids`` and decode ``new_tokens`` tokens greedily, one at a time, with the model's real cache."""
    cache = new_cache(model)
    out = [next_token(model, ids, cache)]
    for _ in range(new_tokens - 1):
        out.append(next_token(model, out[-1], cache))
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
    """Bytes of the distinct weights (tied embeddings counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


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


def _random_ids(model, batch: int, context: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, context), generator=g).to(device)


def _peak_start(device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device, before: int, model) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) - before + weight_bytes(model)


class AttnEditEngine:
    """Prefill eagerly into a static cache, then decode with a (compiled) one-token step."""

    def __init__(self, model, compile: bool):
        self.model = model
        self.compile = compile
        self.kw = _cache_kwarg(model)
        step = lambda token, cache: next_token(model, token, cache, self.kw)  # noqa: E731
        # shapes as generate() compiles them: static first, then dynamic in the dimension that changed
        # (cells run batch-major, so a grid compiles three times: batch 1, batch 1 at a new length, batch > 1)
        self.step = torch.compile(step, mode="reduce-overhead", fullgraph=True) if compile else step

    def decode(self, token, cache) -> torch.Tensor:
        """One decode step (a CUDA-graph replay when compiled); the token is copied out of the graph's pool."""
        if self.compile:
            torch.compiler.cudagraph_mark_step_begin()
        return self.step(token, cache).clone()

    @property
    def warm_steps(self) -> int:
        return 3 if self.compile else 1

    def cache_length(self, context: int, settings: BenchSettings) -> int:
        """Tokens a cell's static cache holds: the prompt, the warm-up and timed steps (and the profiled ones)."""
        extra = settings.decode_tokens if settings.profile else 0  # the profiled steps decode past the timed ones
        return context + self.warm_steps + settings.decode_tokens + extra + 1

    def _one_row_prefilled(self, batch: int, context: int, settings: BenchSettings):
        """A static cache for ``batch`` sequences with row 0 prefilled from a random prompt and copied into every
        other row, and the next token of each row (see :mod:`attnedit.eval.capacity`)."""
        from .capacity import fill_rows_from_first

        model, device = self.model, next(self.model.parameters()).device
        cache = model.new_cache(static=True, batch_size=batch, max_length=self.cache_length(context, settings))
        ids = _random_ids(model, 1, context, settings.seed, device)
        with torch.no_grad():
            first = next_token(model, ids, cache.rows(0, 1), self.kw)
            fill_rows_from_first(cache)
        return cache, first.expand(batch, 1).contiguous()

    def probe(self, batch: int, context: int, settings: BenchSettings) -> bool:
        """Whether ``batch`` sequences of ``context`` tokens fit: their caches, one sequence's prefill, two eager
        decode steps (raises OutOfMemoryError when not)."""
        cache, token = self._one_row_prefilled(batch, context, settings)
        with torch.no_grad():
            for _ in range(2):
                token = next_token(self.model, token, cache, self.kw)
        del cache
        return True

    def serve(self, batch: int, context: int, settings: BenchSettings) -> dict:
        """Decode figures at ``batch`` sequences of ``context`` tokens, each row's cache full (the capacity cell)."""
        model, device = self.model, next(self.model.parameters()).device
        before = _peak_start(device)
        cache, token = self._one_row_prefilled(batch, context, settings)
        with torch.no_grad():
            for _ in range(self.warm_steps):
                token = self.decode(token, cache)
            clock = Clock(device)
            clock.mark()
            for _ in range(settings.decode_tokens):
                token = self.decode(token, cache)
            clock.mark()
            decode_ms = clock.intervals_ms()[0]
        return {
            "step_ms": decode_ms / settings.decode_tokens,
            "decode_tok_s": batch * settings.decode_tokens / (decode_ms / 1e3),
            "peak_mem_bytes": _peak(device, before, model),
        }

    def run(self, batch: int, context: int, settings: BenchSettings) -> dict:
        model, device = self.model, next(self.model.parameters()).device
        steps = settings.decode_tokens
        warm = self.warm_steps
        ids = _random_ids(model, batch, context, settings.seed, device)
        before = _peak_start(device)
        cache = model.new_cache(static=True, batch_size=batch, max_length=self.cache_length(context, settings))
        kv = cache.allocated_bytes()
        ttfts = []
        with torch.no_grad():
            for _ in range(settings.warmup):  # kernels compiled per prompt shape (FlexAttention) stay out of TTFT
                cache.reset()
                next_token(model, ids, cache, self.kw)
            for _ in range(max(1, settings.repeats)):
                cache.reset()
                clock = Clock(device)
                clock.mark()
                token = next_token(model, ids, cache, self.kw)
                clock.mark()
                ttfts.append(clock.intervals_ms()[0])
            t0 = time.perf_counter()
            for _ in range(warm):  # compilation and CUDA-graph capture happen here
                token = self.decode(token, cache)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_s = time.perf_counter() - t0
            clock = Clock(device)
            clock.mark()
            for _ in range(steps):
                token = self.decode(token, cache)
            clock.mark()
            decode_ms = clock.intervals_ms()[0]
            profile = prefill_profile = None
            if settings.profile:
                profile = profile_steps(lambda: self.decode(token, cache), steps, device)

                def prefill():
                    cache.reset()
                    next_token(model, ids, cache, self.kw)

                prefill_profile = profile_steps(prefill, 1, device)  # where TTFT goes
        return {
            "ttft_ms": statistics.median(ttfts),
            "step_ms": decode_ms / steps,
            "decode_tok_s": batch * steps / (decode_ms / 1e3),
            "peak_mem_bytes": _peak(device, before, model),
            "kv_bytes_measured": kv,
            "kv_tokens": cache.max_length,
            "compile_s": round(compile_s, 2) if self.compile else None,
            **({"profile": profile, "prefill_profile": prefill_profile} if profile else {}),
        }


class StockEngine:
    """The teacher through stock ``transformers.generate`` with a static cache (auto-compiled on a GPU)."""

    def __init__(self, model):
        self.model = model

    def _generate(self, ids, new: int):
        return self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )

    def _timed(self, ids, new: int) -> float:
        device = ids.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        self._generate(ids, new)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1e3

    def run(self, batch: int, context: int, settings: BenchSettings) -> dict:
        model, device = self.model, next(self.model.parameters()).device
        ids = _random_ids(model, batch, context, settings.seed, device)
        before = _peak_start(device)
        with torch.no_grad():
            t0 = time.perf_counter()
            self._generate(ids, settings.decode_tokens + 1)  # compiles the decode step for this shape
            compile_s = time.perf_counter() - t0
            firsts = [self._timed(ids, 1) for _ in range(max(1, settings.repeats))]
            totals = [self._timed(ids, settings.decode_tokens + 1) for _ in range(max(1, settings.repeats))]
        ttft, total = statistics.median(firsts), statistics.median(totals)
        decode_ms = max(total - ttft, 1e-6)
        return {
            "ttft_ms": ttft,
            "step_ms": decode_ms / settings.decode_tokens,
            "decode_tok_s": batch * settings.decode_tokens / (decode_ms / 1e3),
            "peak_mem_bytes": _peak(device, before, model),
            "kv_bytes_measured": None,
            "kv_tokens": context + settings.decode_tokens + 1,
            "compile_s": round(compile_s, 2),
        }


def run_once(engine, batch: int, context: int, settings: BenchSettings) -> dict:
    """One cell for one engine (raises OutOfMemoryError when it does not fit)."""
    return engine.run(batch, context, settings)


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


def bytes_per_step(model, config, batch: int, context: int, dtype: str) -> int:
    """What one decode step must read at least: every weight once, and the KV of ``context`` tokens."""
    return weight_bytes(model) + analytic_cache_bytes(config, context, batch, dtype)


def run_bench(student, teacher, settings: BenchSettings, dtype: str, log: Callable[[str], None] = print) -> dict:
    """Every (batch, context) cell for the three engines, as ``bench.json``::

        {"device", "dtype", "decode_tokens", "repeats", "timing", "copy_bandwidth_bytes_s",
         "kv": {"student"|"teacher": {"contexts": [...], "bytes_per_token": [...]}, "ratio": [...]},
         "runs": [{"batch", "context", "student"|"teacher"|"teacher_stock": {FIGURES...} | null,
                   "ratio": {figure: student / teacher}, "ratio_stock": {figure: student / teacher_stock},
                   "largest_batch": {engine: int} (when one did not fit)}]}
    """
    return run_bench_many({"student": student}, teacher, settings, dtype, log)["student"]


def set_engine_options(engines: dict, fuse: bool, prefill: bool) -> None:
    """Fused projections and compiled prefill on (or off) for every model on attnedit's engine together."""
    for name, engine in engines.items():
        model = engine.model
        if hasattr(model, "fuse_projections"):
            model.fuse_projections(fuse)
            model.compile_prefill(PREFILL_BACKEND if prefill else None)
        elif fuse or prefill:  # a checkpoint saved before these options (stock engines have neither, and are skipped)
            flags = " / ".join(f for f, on in (("--fuse-projections", fuse), ("--compile-prefill", prefill)) if on)
            raise AttnEditError(
                f"{name}: this checkpoint's modeling code predates {flags}; save it again with this attnedit "
                f"(attnedit export MODEL --format hf --out NEW), or bench without {flags}"
            )


def run_bench_many(
    students: dict,
    teacher,
    settings: BenchSettings,
    dtype: str,
    log: Callable[[str], None] = print,
    partial: Callable[[dict[str, dict]], None] | None = None,
) -> dict[str, dict]:
    """``run_bench`` for several students of one teacher in one run: the teacher's two engines are timed
    once per cell and shared by every student's result (one ``bench.json`` each, keyed by ``students``'
    names), so each ratio is still taken in the same run while the teacher (and the stock path's
    per-shape compilation) is paid for once. ``partial`` gets the results so far (``"partial": true``)
    after every engine, so a run cut short keeps what it measured."""
    from ..surgery import teacher_on_attnedit

    if not settings.contexts or not settings.batches:
        raise AttnEditError("bench needs at least one context and one batch size")
    for label, student in students.items():
        check_pair(student, teacher)
        check_contexts(student.config, settings.contexts, f"the model {label}" if len(students) > 1 else "the student")
    check_contexts(teacher.config, settings.contexts, "the teacher")
    device = next(teacher.parameters()).device
    compile_ = settings.compile if settings.compile is not None else device.type == "cuda"
    bandwidth = copy_bandwidth(device)
    # the teacher first: a run cut short still has every ratio of the students it finished
    engines = {"teacher": AttnEditEngine(teacher_on_attnedit(teacher), compile_)}
    engines.update({label: AttnEditEngine(model, compile_) for label, model in students.items()})
    set_engine_options(engines, settings.fuse_projections, settings.compile_prefill)  # one path for both models
    if settings.stock:
        engines["teacher_stock"] = StockEngine(teacher)
    configs = {label: model.config for label, model in students.items()}
    configs.update(teacher=teacher.config, teacher_stock=teacher.config)
    timed: dict[str, dict[tuple[int, int], dict | None]] = {}
    largest: dict[tuple[int, int], dict[str, int]] = {}
    header = _header(device, dtype, settings, compile_, bandwidth)
    student_kv = {label: kv_by_context(configs[label], settings.contexts, dtype) for label in students}
    teacher_kv = kv_by_context(teacher.config, settings.contexts, dtype)

    capacity: dict[tuple[str, int], dict] = {}

    def assemble() -> dict[str, dict]:
        return _assemble(header, student_kv, teacher_kv, settings, timed, largest, capacity)

    try:
        for name, engine in engines.items():
            if compile_:
                torch._dynamo.reset()  # each engine compiles its own step; stale graphs would count against the limit
            limits: dict[int, tuple[int, int]] = {}  # context -> (largest fit, smallest failure)
            timed[name] = {}
            role = name if name in ("teacher", "teacher_stock") else "student"
            label = name if len(students) > 1 else role
            for batch in settings.batches:  # batch-major: the compiled step re-specialises on batch 1 only once
                for context in settings.contexts:
                    if name == "teacher_stock" and settings.stock_cells is not None and (batch, context) not in settings.stock_cells:
                        continue
                    if name == "teacher_stock" and compile_:
                        torch._dynamo.reset()  # stock compiles per shape; keep every cell within the recompile limit
                    figures = _cell(engine, batch, context, settings, limits.get(context))
                    if isinstance(figures, int):
                        limits[context] = (figures, min(batch, limits.get(context, (0, batch))[1]))
                        largest.setdefault((batch, context), {})[name] = figures
                        log(f"{name}: batch {batch} at context {context} does not fit in memory; the largest that fits is {figures}")
                        figures = None
                    else:
                        need = bytes_per_step(engine.model, configs[name], batch, context, dtype)
                        figures["kv_bytes_analytic"] = analytic_cache_bytes(configs[name], figures["kv_tokens"], batch, dtype)
                        figures["bytes_per_step"] = need
                        figures["hbm_bound_ms"] = need / bandwidth * 1e3 if bandwidth else None
                        figures["step_over_bound"] = _ratio(figures["step_ms"], figures["hbm_bound_ms"])
                    timed[name][(batch, context)] = figures
                    log(_progress_one(label, {"batch": batch, "context": context, label: figures}))
            if partial is not None and (name != list(engines)[-1] or settings.capacity):
                partial({k: {**v, "partial": True} for k, v in assemble().items()})
        if settings.capacity:
            capacity.update(_capacity(engines, settings, dtype, device, log))
        return assemble()
    finally:  # the models leave as they came: unfused, prefill eager (a later passkey run uses them)
        set_engine_options(engines, False, False)


def _capacity(engines: dict, settings: BenchSettings, dtype: str, device, log) -> dict:
    """{(engine, context): capacity cell} for the engines on attnedit's engine, each measured with the device to
    itself (see :mod:`attnedit.eval.capacity`)."""
    from .capacity import capacity_cell, resident_alone

    if device.type == "cuda":
        memory = int(settings.memory_gb * 2**30) if settings.memory_gb else torch.cuda.mem_get_info(device)[1]
    elif settings.memory_gb:
        memory = int(settings.memory_gb * 2**30)
    else:
        raise AttnEditError("--capacity on a CPU needs --memory-gb (the memory to fill); on a GPU it is the card's")
    ours = {name: e for name, e in engines.items() if isinstance(e, AttnEditEngine)}
    models = [e.model for e in engines.values()]
    out = {}
    set_engine_options(ours, False, False)  # a fused weight would keep a moved model's device memory
    for name, engine in ours.items():
        set_engine_options({name: engine}, settings.fuse_projections, settings.compile_prefill)
        if engine.compile:
            torch._dynamo.reset()
        weights = weight_bytes(engine.model)
        with resident_alone(engine.model, [m for m in models if m is not engine.model]):
            for context in settings.contexts:
                cell = capacity_cell(engine, context, settings, memory, dtype, weights)
                out[(name, context)] = cell
                log(f"{name}: at context {context} serves {cell['largest_batch']} sequences (KV-only limit "
                    f"{cell['kv_only_limit']})" + (f", {cell['decode_tok_s']:,.0f} tok/s" if cell["decode_tok_s"] else ""))
        set_engine_options({name: engine}, False, False)
    return out


def _header(device, dtype: str, settings: BenchSettings, compile_: bool, bandwidth) -> dict:
    """What every ``bench.json`` of one run says about the run itself."""
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": dtype,
        "decode_tokens": settings.decode_tokens,
        "repeats": settings.repeats,
        "timing": "CUDA events, medians" if cuda else "wall clock, medians",
        "engines": {
            "student": "attnedit static cache" + (" + torch.compile (CUDA graphs)" if compile_ else ", eager")
            + (", fused projections" if settings.fuse_projections else "")
            + (", compiled prefill" if settings.compile_prefill else ""),
            "teacher": "the teacher on the same engine as the student",
            "teacher_stock": "transformers generate(cache_implementation='static')" + (" + automatic torch.compile" if cuda else ""),
        },
        "copy_bandwidth_bytes_s": bandwidth,
    }


def _assemble(
    header: dict, student_kv: dict, teacher_kv: dict, settings: BenchSettings, timed: dict, largest: dict, capacity: dict | None = None
) -> dict[str, dict]:
    """One ``bench.json`` per student (``student_kv``'s keys) from the engines' timings so far (an engine
    not yet run: null)."""
    results = {}
    for label, kv in student_kv.items():
        result = {**header, "kv": {"student": kv, "teacher": teacher_kv}, "runs": []}
        if len(student_kv) > 1:
            result["benched_with"] = [other for other in student_kv if other != label]
        result["kv"]["ratio"] = [_ratio(s, t) for s, t in zip(kv["bytes_per_token"], teacher_kv["bytes_per_token"])]
        for context in settings.contexts:
            for batch in settings.batches:
                run = {"batch": batch, "context": context, "student": timed.get(label, {}).get((batch, context)),
                       "teacher": timed.get("teacher", {}).get((batch, context)),
                       "teacher_stock": timed.get("teacher_stock", {}).get((batch, context))}
                fails = {("student" if n == label else n): b for n, b in largest.get((batch, context), {}).items()
                         if n in (label, "teacher", "teacher_stock")}
                if fails:
                    run["largest_batch"] = fails
                run["ratio"] = ratios(run["student"], run["teacher"])
                run["ratio_stock"] = ratios(run["student"], run["teacher_stock"])
                result["runs"].append(run)
        if capacity:
            result["capacity"] = _capacity_rows(label, settings.contexts, capacity)
        results[label] = Bench.model_validate(result).to_dict()  # the bench.json layout, as its record types it
    return results


def _capacity_rows(label: str, contexts: list[int], capacity: dict) -> list[dict]:
    """``bench.json``'s ``capacity``: per context the student's and the teacher's cells and their ratios."""
    from .capacity import capacity_ratios

    rows = []
    for context in contexts:
        student, teacher = capacity.get((label, context)), capacity.get(("teacher", context))
        row = {"context": context, "student": student, "teacher": teacher}
        row["ratio"] = capacity_ratios(student, teacher) if student and teacher else None
        rows.append(row)
    return rows


def _cell(engine, batch: int, context: int, settings: BenchSettings, known: tuple[int, int] | None) -> dict | int:
    """The figures of one cell, or (when it does not fit) the largest batch that fits at this context.

    ``known`` is (largest fit, smallest failure) from an earlier batch at the same context, if any.
    """
    if known and batch >= known[1]:
        return known[0]
    figures = fits(lambda: run_once(engine, batch, context, settings))
    if figures is not None:
        return figures
    quick = dataclasses.replace(settings, decode_tokens=2, repeats=1)

    def ok(b: int) -> bool:
        return fits(lambda: run_once(engine, b, context, quick)) is not None

    return largest_fit(ok, batch)


def _progress_one(name: str, run: dict) -> str:
    f = run.get(name)
    head = f"batch {run['batch']:>4} context {run['context']:>6} {name:>13}: "
    if f is None:
        return head + "out of memory"
    bound = f" ({f['step_over_bound']:.2f}x HBM bound)" if f.get("step_over_bound") else ""
    return head + f"ttft {f['ttft_ms']:.1f} ms, step {f['step_ms']:.3f} ms{bound}, {f['decode_tok_s']:,.0f} tok/s"


def format_bench(result: dict) -> str:
    """The compact table printed at the end of ``attnedit bench``."""
    from ..tables import human_bytes, text_table

    def get(run, name, key):
        f = run.get(name)
        return None if f is None else f.get(key)

    def num(v, fmt):
        return "-" if v is None else fmt.format(v)

    stock = any(r.get("teacher_stock") for r in result["runs"])
    headers = ["batch", "context", "TTFT ms S", "TTFT ms T", "S/T", "tok/s S", "tok/s T"]
    headers += ["tok/s stock"] if stock else []
    headers += ["S/T", "S/stock"] if stock else ["S/T"]
    headers += ["step/bound S", "step/bound T", "KV S", "KV T", "peak S", "peak T"]
    rows = []
    for r in result["runs"]:
        row = [
            r["batch"],
            r["context"],
            num(get(r, "student", "ttft_ms"), "{:,.1f}"),
            num(get(r, "teacher", "ttft_ms"), "{:,.1f}"),
            num(r["ratio"]["ttft_ms"], "{:.2f}"),
            num(get(r, "student", "decode_tok_s"), "{:,.0f}"),
            num(get(r, "teacher", "decode_tok_s"), "{:,.0f}"),
        ]
        if stock:
            row.append(num(get(r, "teacher_stock", "decode_tok_s"), "{:,.0f}"))
        row.append(num(r["ratio"]["decode_tok_s"], "{:.2f}"))
        if stock:
            row.append(num(r.get("ratio_stock", {}).get("decode_tok_s"), "{:.2f}"))
        row += [
            num(get(r, "student", "step_over_bound"), "{:.2f}"),
            num(get(r, "teacher", "step_over_bound"), "{:.2f}"),
            "-" if get(r, "student", "kv_bytes_measured") is None else human_bytes(get(r, "student", "kv_bytes_measured")),
            "-" if get(r, "teacher", "kv_bytes_measured") is None else human_bytes(get(r, "teacher", "kv_bytes_measured")),
            "-" if get(r, "student", "peak_mem_bytes") is None else human_bytes(get(r, "student", "peak_mem_bytes")),
            "-" if get(r, "teacher", "peak_mem_bytes") is None else human_bytes(get(r, "teacher", "peak_mem_bytes")),
        ]
        rows.append(row)
    kv = result["kv"]
    bw = result.get("copy_bandwidth_bytes_s")
    lines = [
        (
            f"device {result['device']}, {result['dtype']}, {result['decode_tokens']} decode tokens, {result['timing']} of "
            f"{result['repeats']}" + (f", copy bandwidth {bw / 1e12:.2f} TB/s" if bw else "")
        ),
        "S = student and T = teacher on attnedit's engine (" + result.get("engines", {}).get("student", "") + "); stock = "
        + result.get("engines", {}).get("teacher_stock", "not run")
        + "; step/bound = decode step time over (weights + KV bytes) / copy bandwidth; KV = bytes the static cache allocates",
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
            lines.append(f"{name}: batch {r['batch']} at context {r['context']} does not fit; largest that fits: {best}")
    if result.get("capacity"):
        lines += ["", format_capacity(result["capacity"])]
    return "\n".join(lines)


def format_capacity(rows: list[dict]) -> str:
    """The serving-capacity table: per context and model, the largest batch served, the KV-only limit, decode
    throughput at that batch, and the student over the teacher (each at its own largest batch)."""
    from ..tables import human_bytes, text_table

    def num(v, fmt):
        return "-" if v is None else fmt.format(v)

    out = []
    for r in rows:
        for name in ("teacher", "student"):
            c = r.get(name)
            if not c:
                continue
            ratio = r.get("ratio") or {}
            out.append([
                r["context"], name, c["largest_batch"], c["kv_only_limit"], human_bytes(c["cache_bytes_per_sequence"]),
                num(c["decode_tok_s"], "{:,.0f}"), num(c["step_ms"], "{:.2f}"),
                "-" if name == "teacher" else num(ratio.get("largest_batch"), "{:.2f}x"),
                "-" if name == "teacher" else num(ratio.get("decode_tok_s"), "{:.2f}x"),
            ])  # fmt: skip
    headers = ["context", "model", "largest batch", "KV-only limit", "cache/seq", "tok/s there", "step ms", "batch S/T", "tok/s S/T"]
    return "serving capacity (each model alone on the device; caches + weights + one sequence's chunked prefill)\n" + text_table(
        headers, out, right=set(range(len(headers)))
    )
