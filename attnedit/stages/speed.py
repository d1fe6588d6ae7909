"""How fast training runs next to the hardware: compilation with an eager fallback, the teacher's
plain-forward baseline, and peak memory.

Every run measures the teacher's plain forward (``teacher(input_ids)``, no grad, the stage's autocast)
at each stage's batch shape before training, so its progress lines, ``metrics.jsonl`` and
``summary.json`` can say what fraction of that speed each stage reaches.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ..errors import is_out_of_memory
from ..targets import AttentionContext
from ..targets.common import first_line

# Exceptions that carry control flow through a compiled call rather than report a compiler failure: gradient
# checkpointing's recomputation stops a layer's forward once it has every tensor the backward needs by raising
# one from inside the call. Caught as a failure, it would turn compilation off in the middle of that recomputation
# and leave the checkpoint's state broken ("target_frame.early_stop is set" on the next layer).
PASS_THROUGH = tuple(c for c in (getattr(torch.utils.checkpoint, "_StopRecomputationError", None),) if isinstance(c, type))


def compile_wanted(setting: str, device: torch.device) -> bool:
    """``auto`` compiles on CUDA only (CPU compilation costs more than it saves at test sizes)."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def _raise_recompile_limit(at_least: int) -> None:
    """Room for one graph per distinct layer kind (e.g. GateSWA's sliding and full layers) and both grad modes."""
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, name) and getattr(dcfg, name) < at_least:
            setattr(dcfg, name, at_least)


class CompileGroup:
    """Modules compiled together; if compiling any of them fails, all run eagerly (one warning). Running out of
    memory in a compiled call is raised as it is (eagerly the call would need more).

    ``wrap(module)`` returns a callable that runs ``torch.compile(module)`` while the group is healthy
    and the eager module otherwise. Modules of one class share their compiled code: dynamo inlines
    ``nn.Module`` calls and treats parameters as inputs, so identical layers compile once.
    """

    def __init__(self, enabled: bool, what: str, backend: str | None = None):
        self.enabled, self.what, self.backend = enabled, what, backend or "inductor"
        self.warned = False
        if enabled:
            _raise_recompile_limit(64)

    def wrap(self, module: nn.Module):
        if not self.enabled:
            return module
        compiled = torch.compile(module, backend=self.backend, dynamic=False)

        def call(*args, **kwargs):
            if self.enabled:
                try:
                    return compiled(*args, **kwargs)
                except PASS_THROUGH:
                    raise
                except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly instead
                    if is_out_of_memory(e):  # not the compiler's fault: eagerly it would need more memory
                        raise
                    self.disable(e)
            return module(*args, **kwargs)

        return call

    def disable(self, error: BaseException) -> None:
        self.enabled = False
        if not self.warned:
            self.warned = True
            print(f"attnedit: warning: torch.compile of {self.what} failed ({type(error).__name__}: {first_line(error)}); running eagerly", file=sys.stderr)


def compile_forwards(modules: list[nn.Module], group: CompileGroup):
    """Run each module's ``forward`` compiled (when ``group`` is enabled); returns the undo function.

    The compiled ``forward`` is an instance attribute, so hooks on the module still run around it (eagerly),
    and modules of one class share one graph. A ``forward`` someone else put on a module is kept and restored.
    """
    if not group.enabled:
        return lambda: None
    before = [m.__dict__.get("forward") for m in modules]
    for m in modules:
        m.forward = group.wrap(m.forward)

    def undo():
        for m, old in zip(modules, before):
            m.__dict__.pop("forward", None)
            if old is not None:
                m.forward = old

    return undo


@dataclasses.dataclass
class _LayerContext(AttentionContext):
    """An :class:`AttentionContext` for one compiled layer call: RoPE tables computed in the graph, not
    looked up in the per-call memo that the layers share (a compiled layer would guard on what the memo
    held when it was traced, and the next layer, finding it filled, would compile a second graph)."""

    def rope(self, rotary, dtype):
        cos_sin = getattr(rotary, "cos_sin", None)
        return cos_sin(self.position_ids, dtype) if cos_sin is not None else super().rope(rotary, dtype)


def layer_context(ctx: AttentionContext) -> AttentionContext:
    """``ctx`` for one compiled layer call (same fields, a memo of its own); identical results."""
    values = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx) if f.init and f.name != "_memo"}
    return _LayerContext(**values)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ids(batch: int, seq: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Token ids from a private generator (the run's RNG state stays untouched)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


@torch.no_grad()
def teacher_forward_tok_s(teacher, batch: int, seq: int, device: torch.device, autocast_ctx, batches: int = 3) -> float:
    """Tokens/s of the teacher's plain forward (``teacher(input_ids)``, logits included) at ``batch x seq``.

    Two warm-up batches, then ``batches`` timed one by one (synchronised on CUDA); the median batch sets
    the rate, so one slow batch (clocks ramping, the allocator growing) does not move the baseline.
    """
    ids = _ids(batch, seq, teacher.config.vocab_size, device)
    times = []
    with autocast_ctx():
        for i in range(2 + max(1, batches)):
            synchronize(device)
            t0 = time.perf_counter()
            out = teacher(input_ids=ids, use_cache=False)
            del out
            synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return batch * seq / max(1e-9, statistics.median(times))


def warm_up(loss_fn, params: list, batch: int, seq: int, vocab: int, device: torch.device, autocast_ctx, group: CompileGroup | None) -> None:
    """One forward and backward on dummy ids before training: compiles (forward and backward) where
    compilation is on, and falls back to eager if that fails. Leaves no gradients behind."""
    ids = _ids(batch, seq, vocab, device)
    if group is not None and group.enabled:
        # an eager pass on a sliver first fills the modules' lazy caches (RoPE frequencies), so the
        # compiled graphs never see them empty: fewer graph variants to compile
        group.enabled = False
        try:
            with torch.no_grad(), autocast_ctx():
                loss_fn(ids[:1, : min(seq, 16)])
        finally:
            group.enabled = True
    try:
        with autocast_ctx():
            loss, _ = loss_fn(ids)
        loss.backward()
    except Exception as e:  # noqa: BLE001
        if group is None or not group.enabled:
            raise
        group.disable(e)
    finally:
        for p in params:
            p.grad = None
    synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated on the GPU since the last reset; None on the CPU."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
