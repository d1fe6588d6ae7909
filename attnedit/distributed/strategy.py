"""The parallelism strategies a conversion runs under: one process, or N processes with FSDP2 and DCP.

A strategy owns what differs between them, so that the stages and the training loop never ask how many
processes there are: which process writes the run folder, how a stage's job is sharded (the FSDP2 plan,
each rank's slice of the batch, metrics averaged over ranks), the gradient norm, the checkpoint format
(one ``.pt`` file, or a DCP folder every rank writes its shards into), how the trained weights come back
whole for saving, and the memory layout the one memory model (:mod:`.memory`) counts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import AttnEditError
from . import checkpoint, env
from .memory import Layout


class Parallelism:
    """One process: whole weights, ``.pt`` checkpoints (:mod:`.checkpoint`), nothing sharded."""

    world = 1
    rank = 0
    main = True  # this process writes the run folder (metrics, checkpoints' metadata, the model)
    compile_frozen = True  # the teacher's own modules may run compiled (FSDP2 wraps them itself)
    profiles = True  # the recipe's profile_steps run here

    def describe(self) -> str:
        return "one process"

    # ----------------------------------------------------------------------------------- processes

    def barrier(self) -> None:
        pass

    def from_main(self, make: Callable[[], object]):
        """``make()`` run by the main process, its result on every process."""
        return make()

    def shutdown(self) -> None:
        pass

    # ----------------------------------------------------------------------------------- sharding

    def layouts(self) -> list[Layout]:
        """The memory layouts this strategy can run in, preferred first."""
        return [Layout()]

    def shard(self, job, teacher, student, layout: Layout, trainable: str, progress: str) -> None:
        """Turn a one-process stage job into this process's part, in place (one process: nothing to do)."""

    def clip_grad_norm(self, params: list, clip: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))

    def batch_variances(self, ys: dict) -> dict | None:
        """Each stage-1 layer's output variance over the global batch when this process holds only a slice; None: its own."""
        return None

    def gather(self, student) -> bool:
        """The trained weights whole, once training is over; whether this process saves the model."""
        return True

    # ----------------------------------------------------------------------------------- checkpoints

    def list_checkpoints(self, run_dir: Path) -> list[Path]:
        return checkpoint.list_checkpoints(run_dir)

    def save_checkpoint(self, run_dir: Path, meta: dict, owned: list, model, opt, keep: int) -> Path:
        """``meta`` (the loop's step, data position, RNG, summary...) with the trained weights and AdamW's state."""
        state = {**meta, "model": {n: p.detach().cpu().clone() for n, p in owned}, "optimizer": opt.state_dict()}
        return checkpoint.save_checkpoint(run_dir, state, keep)

    def load_latest(self, run_dir: Path, accept: Callable[[Path], bool] | None = None, required: bool = True, owned=None) -> dict | None:
        """The newest good checkpoint's state (its trained weights under ``model``), or None."""
        return checkpoint.load_latest(run_dir, accept, required)

    def restore(self, state: dict, owned: list, model, opt) -> None:
        """A checkpoint's trained weights and AdamW state into the live ones."""
        load_weights(owned, state)
        opt.load_state_dict(state["optimizer"])


def load_weights(owned: list, state: dict) -> None:
    """Copy a checkpoint's weights into the live parameters (those it holds)."""
    with torch.no_grad():
        for name, p in owned:
            if name in state["model"]:
                p.copy_(state["model"][name])


class FSDP2(Parallelism):
    """N processes (torchrun): data-parallel stages, FSDP2 units (:mod:`.fsdp`), DCP checkpoints (:mod:`.dcp`).

    Every rank trains on its slice of each global batch (:mod:`.data_parallel`); frozen weights are
    replicated where they fit and sharded per decoder layer where they do not (``ATTNEDIT_FROZEN``
    overrides). ``world`` without a process group: a plan for that many GPUs (the dry run).
    """

    compile_frozen = False
    profiles = False

    def __init__(self, world: int | None = None):
        from .fsdp import frozen_mode

        self.world = world or env.world_size()
        self.rank = env.rank()
        self.main = self.rank == 0
        self.frozen = frozen_mode()

    def describe(self) -> str:
        return f"{self.world} process{'es' if self.world > 1 else ''} under torchrun (FSDP2)"

    def barrier(self) -> None:
        env.barrier()

    def from_main(self, make):
        return env.broadcast_object(make() if self.main else None)

    def shutdown(self) -> None:
        env.shutdown()

    def layouts(self) -> list[Layout]:
        modes = ("replicate", "shard") if self.frozen == "auto" else (self.frozen,)
        if self.frozen == "auto" and self.world == 1:
            modes = ("replicate",)  # one process: nothing to shard over
        return [Layout(self.world, mode == "shard", fsdp_units=True) for mode in modes]

    def shard(self, job, teacher, student, layout: Layout, trainable: str, progress: str) -> None:
        from . import fsdp
        from .data_parallel import RankBatches, reduced

        world = self.world
        if job.cfg.batch_size % world:
            raise AttnEditError(
                f"stage{job.stage}.batch_size={job.cfg.batch_size} does not split over {world} processes; "
                f"use a multiple of {world} (each rank trains on batch_size / {world} sequences)"
            )
        fsdp.check_trainable(trainable, layout.shard_frozen)
        made = fsdp.apply_plan(teacher, student, layout.shard_frozen)
        names = [n for n, _ in job.params]
        live = dict(student.named_parameters())
        job.params = [(n, live[n]) for n in names]  # fully_shard put sharded parameters in their place
        for _, p in job.params:
            p.requires_grad_(True)
        fsdp.sync_replicated_grads(job.params)
        job.stream = RankBatches(job.stream, self.rank, world)
        job.loss_fn = reduced(job.loss_fn)
        if self.main and progress != "none":
            print(
                f"attnedit: stage {job.stage} on {world} processes: {job.cfg.batch_size // world} of {job.cfg.batch_size} "
                f"sequences per rank; FSDP2 units made now: {made['trained']} trained, {made['frozen']} frozen "
                f"(frozen weights {'sharded' if layout.shard_frozen else 'replicated'})",
                file=sys.stderr,
            )

    def clip_grad_norm(self, params, clip):
        return env.local_value(super().clip_grad_norm(params, clip))  # FSDP2 gives a replicated DTensor

    def batch_variances(self, ys):
        from .data_parallel import global_variances

        return global_variances(ys)

    def gather(self, student) -> bool:
        from .fsdp import gather_full

        gather_full(student, keep=self.main)
        return self.main

    def list_checkpoints(self, run_dir):
        from . import dcp

        return dcp.list_checkpoints(run_dir)

    def save_checkpoint(self, run_dir, meta, owned, model, opt, keep):
        from . import dcp

        return dcp.save(run_dir, meta, model, opt, keep)

    def load_latest(self, run_dir, accept=None, required=True, owned=None):
        from . import dcp

        return dcp.load_latest(run_dir, accept, required, owned)

    def restore(self, state, owned, model, opt):
        from . import dcp

        dcp.restore(model, opt, state)


def current() -> Parallelism:
    """The strategy of this process: FSDP2 over the process group when one is active, else one process."""
    return FSDP2() if env.is_distributed() else Parallelism()


def from_env(device: str = "auto") -> Parallelism:
    """Join the process group torchrun describes, if any (:func:`.env.init_from_env`); the strategy for it."""
    env.init_from_env(device)
    return current()
