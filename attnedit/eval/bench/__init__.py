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

The modules: ``settings`` (what to measure), ``engines`` (the three engines), ``timing`` (clocks, peak memory,
bytes and bandwidth), ``capacity`` (serving capacity and the out-of-memory searches), ``runner`` (the grid and
``bench.json``) and ``format`` (the printed tables).
"""

from .capacity import capacity_cell, fits, largest_batch, largest_fit, release_memory
from .engines import AttnEditEngine, StockEngine, set_engine_options
from .format import format_bench, format_capacity
from .runner import run_bench, run_bench_many
from .settings import BenchSettings
from .timing import Clock, weight_bytes

__all__ = [
    "AttnEditEngine",
    "BenchSettings",
    "Clock",
    "StockEngine",
    "capacity_cell",
    "fits",
    "format_bench",
    "format_capacity",
    "largest_batch",
    "largest_fit",
    "release_memory",
    "run_bench",
    "run_bench_many",
    "set_engine_options",
    "weight_bytes",
]
