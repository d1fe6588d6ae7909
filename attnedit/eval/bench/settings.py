"""What ``attnedit bench`` measures: its flags and the recipe's ``eval.bench:`` section, one typed dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from ...schema import FieldError, require, setting


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
    fold_absorbed: bool = setting(
        False, "MLA: fold each layer's absorbed-decode up-projections into its query and output projections where that "
        "reads at most 4 MiB more a layer (model.fold_absorbed(): small latents; two fewer kernels a layer per decode "
        "step, the folded copies held beside the weights)",
    )  # fmt: skip
    compile_prefill: bool = setting(
        False, "also compile the prefill's element-wise work (model.compile_prefill(): norms, MLP activation, residuals; "
        "dynamic shapes) for the student and the teacher on attnedit's engine; the stock path's prefill stays eager, "
        "as transformers runs it",
    )  # fmt: skip
    capacity: bool = setting(
        False, "also find, at every context, the largest batch each model serves on this device (its caches, the "
        "weights and one sequence's chunked prefill in memory at once; the other models' weights moved to host "
        "memory meanwhile) and its decode throughput there (and that step over its HBM bound), next to the KV-only "
        "limit (memory - weights) / cache bytes per sequence",
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
