"""The conversion's backbone types: the :class:`Conversion` context the stages work on, a :class:`Stage`
(what one stage trains, its loss, data, compilation and activation memory), and the :class:`StageJob`
the training loop runs. ``stage1.py`` and ``stage2.py`` each define one Stage; ``plan.stages`` lists them
in order; ``convert.py`` runs them; the strategy (``attnedit.distributed``) says how they are laid out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from ..data import DataConfig
from ..distributed import Parallelism
from ..recipe import StageConfig
from .speed import CompileGroup

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict]]


@dataclasses.dataclass
class Conversion:
    """What every stage of one conversion works on: the frozen teacher, the edited student (sharing the
    teacher's frozen modules), the tokenizer, the device, the run folder and the strategy. The recipe's
    settings reach the stages through their :class:`Stage` objects."""

    teacher: nn.Module
    student: nn.Module
    tokenizer: object
    device: torch.device
    run_dir: Path
    parallel: Parallelism

    def owned(self) -> list[tuple[str, nn.Parameter]]:
        """The student's weights that are not the teacher's: what training changes and checkpoints hold."""
        return owned_parameters(self.student, self.teacher)

    @property
    def edited_layers(self) -> list[int]:
        return list(self.student.config.edit["edited_layers"])


def owned_parameters(student, teacher) -> list[tuple[str, nn.Parameter]]:
    """The student's weights that are not the teacher's."""
    teacher_ids = {id(p) for p in teacher.parameters()}
    return [(n, p) for n, p in student.named_parameters() if id(p) not in teacher_ids]


@dataclasses.dataclass
class StageJob:
    """One stage to run: ``loss_fn(ids) -> (loss, extras)``; extras are floats or per-layer lists."""

    stage: int
    cfg: StageConfig
    params: list[tuple[str, nn.Parameter]]
    loss_fn: LossFn
    stream: object  # attnedit.data.BlockStream (or the DeviceBatches that prefetch from one)
    seq_len: int
    model: nn.Module | None = None  # the student (a sharded strategy's checkpoints read its state)
    teacher_fwd_tok_s: float | None = None  # the teacher's plain forward at this stage's batch shape
    teacher_forward: Callable[[torch.Tensor], object] | None = None  # that forward, for profile_stage

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.seq_len


def stage_data(data: DataConfig, seq_len: int) -> DataConfig:
    """The data settings at ``seq_len``, holding out at least the documents of the held-out blocks
    (counted at ``data.seq_len``)."""
    held = -(-data.heldout_blocks * data.seq_len // seq_len)
    return dataclasses.replace(data, seq_len=seq_len, heldout_blocks=held)


class Stage:
    """One stage of the conversion: its settings (``cfg``, the recipe's ``stage<N>`` section, possibly
    fitted to the GPU: see :meth:`fitted`; ``asked``, as the recipe says it), sequence length and data
    (the recipe's ``data`` section at that length, read with the recipe's ``seed``), and what it does to
    the models.

    A subclass says what trains (:meth:`trainable`), the loss of one batch (:meth:`loss`), what runs
    compiled (:meth:`compile`), what it needs of the student's structure (:meth:`prepare`, also when a
    checkpoint of it is loaded) and the activations a micro-batch keeps (:meth:`activation_bytes`).
    """

    number: int = 0  # 1 or 2: the metrics' "stage", checkpoint names, summary.json's "stage<N>"
    compiles: str = ""  # what the stage compiles, for the warning if compiling fails
    trains: str = "attention"  # which teacher modules the student trains copies of (the FSDP2 plan checks it)
    recomputed_layers: int | None = None  # under gradient checkpointing, the first layers recomputed; None: all

    def __init__(self, cfg: StageConfig, data: DataConfig, seed: int):
        self.cfg = self.asked = cfg
        self.seq_len = cfg.seq_len or data.seq_len
        self.data = stage_data(data, self.seq_len)
        self.seed = seed

    @property
    def key(self) -> str:
        return f"stage{self.number}"

    @property
    def runs(self) -> bool:
        return self.cfg.steps > 0

    def finished(self, state: dict | None) -> bool:
        """Whether a checkpoint's ``state`` is past this stage (or at its last step)."""
        return state is not None and (state["stage"] > self.number or (state["stage"] == self.number and state["done"]))

    def fitted(self, batch_size: int, grad_accum: int, recomputed_layers: int | None) -> Stage:
        """This stage with another micro-batch, gradient accumulation (and where it has the switch, that many of
        the first layers recomputed in the backward: 0 turns gradient checkpointing off)."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        changes = {"batch_size": batch_size, "grad_accum": grad_accum}
        if recomputed_layers is not None:
            changes["gradient_checkpointing"] = recomputed_layers > 0
            out.recomputed_layers = recomputed_layers or None
        out.cfg = dataclasses.replace(self.cfg, **changes)
        return out

    @property
    def gradient_checkpointing(self) -> bool | None:
        """The stage's gradient checkpointing setting; None where it has none."""
        return None

    # ---------------------------------------------------------------------------- what a subclass says

    def prepare(self, student, teacher) -> None:
        """Change the student's structure as the stage needs (before training it, or loading its checkpoint)."""

    def trainable(self, student) -> list[tuple[str, nn.Parameter]]:
        raise NotImplementedError

    def loss(self, ctx: Conversion, group: CompileGroup) -> LossFn:
        raise NotImplementedError

    def compile(self, ctx: Conversion, group: CompileGroup) -> Callable[[], None]:
        """Run the stage's modules compiled (when ``group`` is enabled); returns the undo."""
        return lambda: None

    def train_mode(self, student) -> None:
        """Set the student's training switches for this stage."""

    def activation_bytes(self, config, edited, micro: int, recomputed: int, device: torch.device, abytes: int) -> float:
        """A rough upper figure for the activations one micro-batch of ``micro`` sequences keeps for backward,
        with ``recomputed`` of the decoder layers under gradient checkpointing (where the stage has it)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------- shared

    def stream(self, ctx: Conversion):
        """The stage's data: its own shuffle of the data (seed + stage - 1) at its own sequence length,
        reaching the device one batch ahead of training (pinned, non-blocking on CUDA); resume stays exact."""
        from ..data import BlockStream, DeviceBatches
        from ..data.recall import with_recall_spans

        recall = getattr(self.cfg, "recall_fraction", 0.0)  # stage 2's long-range retrieval mix (attnedit.data.recall)
        distance = getattr(self.cfg, "recall_min_distance", 0)
        transform = partial(with_recall_spans, fraction=recall, seed=self.seed, min_distance=distance) if recall else None
        blocks = BlockStream(self.data, ctx.tokenizer, seed=self.seed + self.number - 1)
        return DeviceBatches(blocks, ctx.device, transform=transform)

    def job(self, ctx: Conversion, group: CompileGroup | None = None) -> StageJob:
        """The stage's trainable parameters, loss and data stream; everything else frozen."""
        group = group or CompileGroup(False, self.compiles)
        stream = self.stream(ctx)
        params, loss_fn = self.trainable(ctx.student), self.loss(ctx, group)
        self.train_mode(ctx.student)
        for p in ctx.student.parameters():
            p.requires_grad_(False)
        for _, p in params:
            p.requires_grad_(True)
        return StageJob(self.number, self.cfg, params, loss_fn, stream, self.seq_len, model=ctx.student)
