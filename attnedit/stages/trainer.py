"""The training loop both stages share: AdamW with warm-up and decay, gradient accumulation and
clipping, bf16 autocast where it pays, metrics, checkpoints, signals and non-finite recovery.

A stage is a :class:`~attnedit.stages.base.StageJob`: what trains, a loss function of one batch of
token ids, and the data stream. How it is laid out over processes (the checkpoint format, the gradient
norm of sharded weights) is the run's strategy's (``attnedit.distributed``). The loop is deterministic given the seed: the learning rate is a pure function of the
step (times a scale that only a non-finite restart changes), and everything else that evolves (weights,
optimizer, data position, RNG) is in every checkpoint, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..devices import autocast
from ..distributed.checkpoint import rng_state, set_rng_state
from ..errors import AttnEditError
from ..provenance import provenance
from ..recipe import Recipe, StageConfig
from .base import Conversion, StageJob

DIVERGENCE_HISTORY = 5  # logged losses the divergence guard compares with (their median)


def lr_at(step: int, cfg: StageConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine/linear/constant decay."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup - 1)
    p = min(1.0, (step - cfg.warmup) / span)
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * p
    return cfg.lr


def make_optimizer(params: list[tuple[str, nn.Parameter]], cfg: StageConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm weights and biases are left alone).

    The fused CUDA kernel when every weight is on a GPU, the multi-tensor (foreach) one elsewhere.
    """
    decay = [p for _, p in params if p.dim() >= 2]
    rest = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    on_gpu = bool(params) and all(p.is_cuda and p.is_floating_point() for _, p in params)
    kind = {"fused": True} if on_gpu else {"foreach": True}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), **kind)


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) plus TensorBoard when it is installed."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.touch()
        self.tb = None
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def offset(self) -> int:
        return self.path.stat().st_size

    def truncate(self, offset: int) -> None:
        """Forget lines written after a checkpoint that a resume or restart goes back to."""
        with open(self.path, "r+b") as fh:
            fh.truncate(offset)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("stage", "step"):
                    self.tb.add_scalar(f"stage{record['stage']}/{key}", value, record["step"])
            self.tb.flush()


class _NoMetrics:
    """What processes other than the main one log to: nothing."""

    def offset(self) -> int:
        return 0

    def truncate(self, offset: int) -> None:
        pass

    def write(self, record: dict) -> None:
        pass


class Run:
    """One run folder while it trains: metrics, checkpoints, the summary so far, and stop requests."""

    def __init__(self, ctx: Conversion, recipe: Recipe, summary: dict, progress: str = "auto"):
        self.dir = ctx.run_dir
        self.recipe = recipe
        self.made_by = provenance(recipe)  # attnedit's version and the resolved recipe, in every checkpoint
        self.device = ctx.device
        self.parallel = ctx.parallel
        self.summary = summary
        self.metrics = MetricsLog(self.dir) if self.parallel.main else _NoMetrics()  # the main process writes the log
        self.progress = progress if progress != "auto" else ("bar" if sys.stderr.isatty() else "lines")
        self.stop_signal: int | None = None
        self.started = time.time()
        self.wall_before = float(summary.get("wall_s", 0.0))
        self.owned: list[tuple[str, nn.Parameter]] = []  # every trained weight: what checkpoints hold

    def wall(self) -> float:
        return self.wall_before + time.time() - self.started

    def stamp_wall(self, stage: int) -> None:
        """Wall time so far into the summary (the run's, and the stage's), before a checkpoint saves it."""
        self.summary["wall_s"] = self.wall()
        info = self.summary.get(f"stage{stage}", {})
        if "wall_start" in info:
            info["wall_s"] = round(self.summary["wall_s"] - info["wall_start"], 1)

    def checkpoint(self, job: StageJob, opt, step: int, lr_scale: float, restarts: int, window: _Window | None = None) -> Path:
        """Everything a resume needs, in the strategy's checkpoint format (with the trained weights and AdamW's state)."""
        self.stamp_wall(job.stage)
        meta = {
            "version": 1,
            "stage": job.stage,
            "step": step,
            "done": step >= job.cfg.steps,
            "lr_scale": lr_scale,
            "restarts": restarts,
            "data": job.stream.state_dict(),
            "rng": rng_state(),
            "metrics_offset": self.metrics.offset(),
            "summary": self.summary,
            "attnedit": self.made_by,  # version and resolved recipe that made this checkpoint
            # the log window in progress and the guard's recent losses: a resume logs what the
            # uninterrupted run logs, even when it stopped between two log steps
            "window": window.state_dict() if window is not None else None,
        }
        return self.parallel.save_checkpoint(self.dir, meta, self.owned, job.model, opt, self.recipe.keep_checkpoints)

    @contextlib.contextmanager
    def stop_on_signals(self):
        """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second SIGINT (Ctrl-C
        twice) stops at once. A repeated SIGTERM does not: ``timeout``, schedulers and launchers often send it
        twice (to the process, then to its process group), and the second must not cut the checkpoint short."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_signal is not None:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                return  # SIGTERM again: the checkpoint after this step is already on its way
            self.stop_signal = signum
            print(f"\nattnedit: {signal.Signals(signum).name}: saving a checkpoint after this step", file=sys.stderr)

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _restore(run: Run, job: StageJob, opt, state: dict) -> _Window:
    """Put the run back to ``state``; returns the log window as it stood then."""
    run.parallel.restore(state, run.owned, job.model, opt)
    job.stream.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    run.metrics.truncate(state["metrics_offset"])
    run.summary = state["summary"]
    return _Window.from_state(state.get("window"))


class _Window:
    """Running means of the loss and extras between two log lines.

    Values may be device tensors (scalars or per-layer vectors): they are summed on the device and read
    back to the host in one transfer, by :meth:`means`, at a log step. ``paused`` is time to leave out
    of the tokens/s figure (checkpoint writes).
    """

    def __init__(self, logged: list[float] | None = None):
        self.n, self.sums, self.t0, self.tokens, self.paused = 0, {}, time.time(), 0, 0.0
        self.logged = list(logged or [])[-DIVERGENCE_HISTORY:]  # recent logged losses (divergence guard)

    def state_dict(self) -> dict:
        self.materialise()
        return {"n": self.n, "sums": self.sums, "tokens": self.tokens, "logged": self.logged}

    @classmethod
    def from_state(cls, state: dict | None) -> _Window:
        w = cls()
        if state:
            w.n, w.sums, w.logged = state["n"], state["sums"], list(state["logged"])  # tokens only time tok_s
        return w

    def next(self, loss: float) -> _Window:
        """A fresh window after a log line with mean ``loss``."""
        return _Window(self.logged + [loss])

    def add(self, values: dict, tokens: int) -> None:
        self.n += 1
        self.tokens += tokens
        for k, v in values.items():
            if isinstance(v, list):
                prev = self.sums.get(k, [0.0] * len(v))
                self.sums[k] = [a + b for a, b in zip(prev, v)]
            elif k not in self.sums:
                self.sums[k] = v
            else:
                prev = self.sums[k]
                if isinstance(prev, list) and isinstance(v, torch.Tensor):  # materialised by a checkpoint mid-window
                    prev = torch.tensor(prev, dtype=v.dtype, device=v.device)
                self.sums[k] = prev + v

    def materialise(self) -> None:
        """Replace device sums by Python floats / lists of floats (one host sync for all of them)."""
        tensors = {k: v for k, v in self.sums.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            return
        flat = torch.cat([v.detach().reshape(-1).to(torch.float64) for v in tensors.values()]).tolist()
        for k, v in tensors.items():
            part, flat = flat[: v.numel()], flat[v.numel() :]
            self.sums[k] = part if v.dim() else part[0]

    def means(self) -> dict:
        self.materialise()
        out = {}
        for k, v in self.sums.items():
            out[k] = [round(x / self.n, 6) for x in v] if isinstance(v, list) else v / self.n
        return out

    def seconds(self) -> float:
        return max(1e-9, time.time() - self.t0 - self.paused)

    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds()


class _Speed:
    """This run's tokens/s over a stage, leaving out its first log window (warm-up, allocator growth)."""

    def __init__(self):
        self.windows, self.tokens, self.seconds = 0, 0, 0.0
        self.first = (0, 0.0)

    def add(self, window: _Window) -> None:
        self.windows += 1
        if self.windows == 1:
            self.first = (window.tokens, window.seconds())
        else:
            self.tokens += window.tokens
            self.seconds += window.seconds()

    def figures(self, baseline: float | None) -> dict:
        tokens, seconds = (self.tokens, self.seconds) if self.windows > 1 else self.first
        tok_s = round(tokens / max(1e-9, seconds), 1)
        ratio = float(f"{tok_s / baseline:.4g}") if baseline else None
        return {"tok_s": tok_s, "teacher_fwd_tok_s": round(baseline, 1) if baseline else None, "ratio": ratio}


def diverged(loss: float, logged: list[float], factor: float) -> bool:
    """A logged loss far above its recent level: over ``factor`` x the median of the last logged losses.

    Needs 3 earlier log lines first, so the first steps of a stage (whose losses only fall) never count.
    """
    if factor <= 0 or len(logged) < 3:
        return False
    recent = sorted(logged[-DIVERGENCE_HISTORY:])
    median = recent[len(recent) // 2]
    return loss > factor * max(median, 1e-12)


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _recover(run: Run, job: StageJob, opt, step: int, lr_scale: float, restarts: int, what: str):
    """A non-finite or diverging loss at ``step``: back to the newest good checkpoint of this stage
    (verified; older ones are tried when the newest is bad), with the learning rate halved."""
    if restarts >= run.recipe.max_nonfinite_restarts:
        raise AttnEditError(
            f"stage {job.stage} step {step}: the loss is still {what} after {restarts} restarts "
            f"with halved learning rates; lower stage{job.stage}.lr or raise max_nonfinite_restarts"
        )
    state = run.parallel.load_latest(run.dir, accept=lambda p: p.name.startswith(f"stage{job.stage}-"), required=False)
    if state is None:
        raise AttnEditError(
            f"stage {job.stage} step {step}: the loss is {what} and no good checkpoint of stage {job.stage} is left "
            f"to go back to; lower stage{job.stage}.lr and start the run again with another --out"
        )
    window = _restore(run, job, opt, state)
    step, lr_scale, restarts = state["step"], lr_scale * 0.5, restarts + 1
    event = "nonfinite" if what == "non-finite" else "diverged"
    run.metrics.write({"stage": job.stage, "event": event, "restored_step": step, "lr_scale": lr_scale})
    print(f"attnedit: {what} loss in stage {job.stage}; back to step {step}, lr x{lr_scale:g}", file=sys.stderr)
    return step, lr_scale, restarts, window


def accumulate_gradients(run: Run, job: StageJob, params: list) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One optimizer step's micro-batches, forward and backward, then gradient clipping. Returns the
    metrics (means over the micro-batches), whether every loss and the gradient norm are finite, and the
    gradient norm - all device tensors: nothing is read back to the host here."""
    cfg = job.cfg
    values, finite = {}, None
    for _ in range(cfg.grad_accum):
        ids = job.stream.next_batch(cfg.batch_size).to(run.device, non_blocking=True)
        with autocast(run.device, cfg.precision):
            loss, extras = job.loss_fn(ids)
        loss = loss if isinstance(loss, torch.Tensor) else torch.tensor(float(loss), device=run.device)
        ok = torch.isfinite(loss.detach())
        finite = ok if finite is None else finite & ok
        (loss / cfg.grad_accum).backward()
        for k, v in {"loss": loss.detach(), **extras}.items():  # means over the micro-batches
            if isinstance(v, list):
                values[k] = [a + b / cfg.grad_accum for a, b in zip(values.get(k, [0.0] * len(v)), v)]
            else:
                values[k] = values[k] + v / cfg.grad_accum if k in values else v / cfg.grad_accum
    grad_norm = run.parallel.clip_grad_norm(params, cfg.clip)
    return values, finite & torch.isfinite(grad_norm).to(finite.device), grad_norm


def train_stage(run: Run, job: StageJob, resume: dict | None) -> torch.optim.Optimizer:
    """Run (or continue) one stage to its last step; the last logged metrics go to the summary. Returns the
    optimizer (for :func:`profile_stage`)."""
    cfg, recipe = job.cfg, run.recipe
    params = [p for _, p in job.params]
    opt = make_optimizer(job.params, cfg)
    step, lr_scale, restarts = 0, 1.0, 0
    window = _Window()
    if resume is not None:
        window = _restore(run, job, opt, resume)
        step, lr_scale, restarts = resume["step"], resume["lr_scale"], resume["restarts"]
    else:
        run.checkpoint(job, opt, 0, lr_scale, restarts, window)  # the point a non-finite restart can go back to
    bar = None
    if run.progress == "bar":
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"stage {job.stage}", unit="step", dynamic_ncols=True)
    t_start, step_start, speed = time.time(), step, _Speed()
    while step < cfg.steps:
        lr = lr_at(step, cfg) * lr_scale
        for group in opt.param_groups:
            group["lr"] = lr
        # the hot path reads nothing back from the device but one flag per step: losses, extras and the
        # gradient norm stay device tensors until a log step (see _Window)
        values, finite, grad_norm = accumulate_gradients(run, job, params)
        finite = bool(finite)  # the step's one host sync
        if not finite:
            opt.zero_grad(set_to_none=True)
            step, lr_scale, restarts, window = _recover(run, job, opt, step + 1, lr_scale, restarts, "non-finite")
            if bar is not None:
                bar.n = step
                bar.refresh()
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        values["grad_norm"] = grad_norm.detach()
        window.add(values, job.tokens_per_step)
        if step % recipe.log_every == 0 or step == cfg.steps:
            means = window.means()  # the one read-back of the window's figures
            if diverged(means["loss"], window.logged, recipe.divergence_factor):
                step, lr_scale, restarts, window = _recover(run, job, opt, step, lr_scale, restarts, "diverging")
                if bar is not None:
                    bar.n = step
                    bar.refresh()
                continue
            last = {"stage": job.stage, "step": step, "tokens": step * job.tokens_per_step, "lr": lr, **means}
            last["tok_s"] = round(window.tokens_per_s(), 1)
            speed.add(window)
            speed_line = ""
            if job.teacher_fwd_tok_s:
                last["teacher_fwd_tok_s"] = round(job.teacher_fwd_tok_s, 1)
                last["ratio"] = float(f"{last['tok_s'] / job.teacher_fwd_tok_s:.4g}")
                speed_line = f" ({last['ratio']:.2f}x teacher fwd)"
            run.metrics.write(last)
            info = run.summary.setdefault(f"stage{job.stage}", {})
            info["final"] = last
            info.update(speed.figures(job.teacher_fwd_tok_s))
            eta = (cfg.steps - step) * (time.time() - t_start) / max(1, step - step_start)
            if bar is not None:
                bar.set_postfix(loss=f"{means['loss']:.4g}", tok_s=f"{last['tok_s']:.0f}{speed_line}")
            elif run.progress == "lines":
                print(
                    f"stage {job.stage} step {step}/{cfg.steps} loss {means['loss']:.4f} lr {lr:.2e} {last['tok_s']:.0f} tok/s{speed_line} ETA {_fmt_eta(eta)}",
                    file=sys.stderr,
                    flush=True,
                )
            window = window.next(means["loss"])
        if bar is not None:
            bar.update(1)
        saved = False
        if step % recipe.checkpoint_every == 0 or step == cfg.steps:
            t_ckpt = time.time()
            run.checkpoint(job, opt, step, lr_scale, restarts, window)
            window.paused += time.time() - t_ckpt  # checkpoint writes are not training speed
            saved = True
        if run.stop_signal is not None:
            if not saved:
                run.checkpoint(job, opt, step, lr_scale, restarts, window)
            if bar is not None:
                bar.close()
            print(
                f"attnedit: stopped at stage {job.stage} step {step}; checkpoint saved; continue with: attnedit convert {run.dir} --resume",
                file=sys.stderr,
            )
            raise KeyboardInterrupt
    if bar is not None:
        bar.close()
    return opt


def profile_stage(run: Run, job: StageJob, opt: torch.optim.Optimizer) -> dict:
    """``recipe.profile_steps`` more optimizer steps of a finished stage under ``torch.profiler``, next to one
    teacher plain forward of a batch of the same shape: device time per step by kernel family, and the
    costliest kernels. The steps read fresh batches and move the weights, which are restored afterwards
    (the optimizer is not used again), so a profiled run saves the same model as an unprofiled one."""
    from ..profiling import profile_steps

    cfg, device, steps = job.cfg, run.device, run.recipe.profile_steps
    params = [p for _, p in job.params]
    saved = [p.detach().to("cpu", copy=True) for p in params]  # host copies: no device memory for the restore point

    def step():  # the training loop's step, without its one host sync
        accumulate_gradients(run, job, params)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        step()  # unprofiled: anything done once (allocator growth, lazy tables) stays out of the profile
        out = {"steps": steps, "tokens_per_step": job.tokens_per_step, "grad_accum": cfg.grad_accum}
        out["student_step"] = profile_steps(step, steps, device)
        if job.teacher_forward is not None:
            ids = job.stream.next_batch(cfg.batch_size).to(device)

            @torch.no_grad()
            def forward():
                with autocast(device, cfg.precision):
                    job.teacher_forward(ids)

            forward()
            teacher = profile_steps(forward, 1, device)
            out["teacher_forward"] = teacher
            # a step holds grad_accum batches: the teacher's forward over the same tokens, and the ratio the
            # tokens/s figures show, in device time
            same_tokens = teacher["device_ms_per_step"] * cfg.grad_accum
            out["teacher_forward_ms_same_tokens"] = round(same_tokens, 4)
            out["device_ratio"] = round(same_tokens / max(1e-9, out["student_step"]["device_ms_per_step"]), 4)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        opt.zero_grad(set_to_none=True)
    return out
