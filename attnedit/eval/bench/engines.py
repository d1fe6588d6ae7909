"""The engines the bench times, each a ``run(batch, context, settings) -> figures`` for one cell:

- :class:`AttnEditEngine`: a model on attnedit's engine (the edited student, or the teacher rebuilt on it): a
  static cache allocated once for the whole generation, an eager prefill, then a one-token decode step compiled
  with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) on a GPU - what ``generate()`` runs. It also serves
  the capacity search (:meth:`~AttnEditEngine.probe`, :meth:`~AttnEditEngine.serve`);
- :class:`StockEngine`: the teacher through stock ``transformers`` ``generate(..., cache_implementation="static")``
  with its automatic ``torch.compile``. Its TTFT is a 1-token generate; its decode rate comes from the extra time
  of ``decode_tokens`` more tokens.

:func:`set_engine_options` turns the models' fused projections, compiled prefill and MLA's folded decode on or off together.
"""

from __future__ import annotations

import statistics
import time

import torch

from ...errors import AttnEditError
from ...profiling import profile_steps
from ..generation import cache_kwarg, next_token
from .settings import BenchSettings
from .timing import Clock, peak_bytes, peak_start

PREFILL_BACKEND = "inductor"  # torch.compile backend of --compile-prefill


def random_ids(model, batch: int, context: int, seed: int, device) -> torch.Tensor:
    """Random prompts ``[batch, context]`` (token ids from 3 up), the same for one seed."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, context), generator=g).to(device)


@torch.no_grad()
def fill_rows_from_first(cache) -> None:
    """Give every row of a static cache the contents and token count of row 0 (after row 0's prefill)."""
    for layer in cache.layers:
        for t in layer.tensors():
            t[1:].copy_(t[:1].expand_as(t[1:]))
    cache.real[1:] = cache.real[0]
    cache.n_cached_device.copy_(cache.real[0])


class AttnEditEngine:
    """Prefill eagerly into a static cache, then decode with a (compiled) one-token step."""

    def __init__(self, model, compile: bool):
        self.model = model
        self.compile = compile
        self.kw = cache_kwarg(model)
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
        other row, and the next token of each row (see :mod:`.capacity`)."""
        model, device = self.model, next(self.model.parameters()).device
        cache = model.new_cache(static=True, batch_size=batch, max_length=self.cache_length(context, settings))
        ids = random_ids(model, 1, context, settings.seed, device)
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
        before = peak_start(device)
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
            "peak_mem_bytes": peak_bytes(device, before, model),
        }

    def run(self, batch: int, context: int, settings: BenchSettings) -> dict:
        model, device = self.model, next(self.model.parameters()).device
        steps = settings.decode_tokens
        warm = self.warm_steps
        ids = random_ids(model, batch, context, settings.seed, device)
        before = peak_start(device)
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
            "peak_mem_bytes": peak_bytes(device, before, model),
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
        ids = random_ids(model, batch, context, settings.seed, device)
        before = peak_start(device)
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
            "peak_mem_bytes": peak_bytes(device, before, model),
            "kv_bytes_measured": None,
            "kv_tokens": context + settings.decode_tokens + 1,
            "compile_s": round(compile_s, 2),
        }


def run_once(engine, batch: int, context: int, settings: BenchSettings) -> dict:
    """One cell for one engine (raises OutOfMemoryError when it does not fit)."""
    return engine.run(batch, context, settings)


def set_engine_options(engines: dict, fuse: bool, prefill: bool, fold: bool = False) -> None:
    """Fused projections, compiled prefill and MLA's folded decode on (or off) for every model on attnedit's engine
    together (the teacher has no MLA layer to fold)."""
    for name, engine in engines.items():
        model = engine.model
        missing = [f for f, on, method in (("--fuse-projections", fuse, "fuse_projections"), ("--compile-prefill", prefill, "compile_prefill"),
                                           ("--fold-absorbed", fold, "fold_absorbed")) if on and not hasattr(model, method)]  # fmt: skip
        if missing:  # a checkpoint saved before these options (stock engines have none, and are skipped)
            flags = " / ".join(missing)
            raise AttnEditError(
                f"{name}: this checkpoint's modeling code predates {flags}; save it again with this attnedit "
                f"(attnedit export MODEL --format hf --out NEW), or bench without {flags}"
            )
        if hasattr(model, "fuse_projections"):
            model.fuse_projections(fuse)
            model.compile_prefill(PREFILL_BACKEND if prefill else None)
        if hasattr(model, "fold_absorbed"):
            model.fold_absorbed(fold)
