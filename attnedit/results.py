"""Typed results: one record per file a run writes, and the one place that names each file and reads or
writes it.

==============  ===========  =================================================================
file            record       written by
==============  ===========  =================================================================
summary.json    Summary      ``convert``: what each stage trained, held-out losses, KV figures
eval.json       Quality      ``eval`` (and ``convert``'s eval section): perplexity, few-shot accuracy
passkey.json    Passkey      ``passkey`` (and ``bench --passkey``): retrieval per context and depth
bench.json      Bench        ``bench``: per (batch, context) the engines' figures, and the KV figures
==============  ===========  =================================================================

A run folder's training checkpoints go in :data:`CHECKPOINT_DIR`, and :func:`list_checkpoints` finds the finished
ones (:mod:`attnedit.distributed.checkpoint` and :mod:`attnedit.distributed.dcp` write and read them; ``attnedit
report`` only looks whether a stopped run kept one).

Each record's field names are the file's JSON keys, so a file written before these records existed (the run
folders under ``docs/results/``) reads as it is. A key a record does not name (a newer writer's) is kept and
written back; a key a file lacks stays absent when the record is written again (``to_dict`` writes the keys
that were set). Reading a file that is not JSON, or whose values do not have the record's layout, is one line
naming the file; writing one goes through :func:`attnedit.io.write_json` (atomic, one-line failures).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import AttnEditError
from .io import write_json

Number = int | float
CHECKPOINT_DIR = "checkpoints"  # the run folder's training checkpoints: stage{S}-step{N}.pt files, .dcp folders
_CHECKPOINT_NAME = re.compile(r"^stage(\d)-step(\d{6,})\.(pt|dcp)$")


def list_checkpoints(run_dir: str | Path, suffix: str = ".pt") -> list[Path]:
    """Finished checkpoints named ``stage{S}-step{N}{suffix}`` in the run folder's :data:`CHECKPOINT_DIR`, oldest
    first (by stage, then step): ``.pt`` files (one process; a file there is complete, it is renamed into place) or
    ``.dcp`` folders (sharded runs) whose ``meta.pt``, which rank 0 writes last, is there."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = []
    for p in folder.glob(f"stage*-step*{suffix}") if folder.is_dir() else []:
        m = _CHECKPOINT_NAME.match(p.name)
        if m and p.suffix == suffix and (suffix != ".dcp" or (p / "meta.pt").is_file()):
            found.append(((int(m.group(1)), int(m.group(2))), p))
    return [p for _, p in sorted(found)]


class Record(BaseModel):
    """A JSON object whose known keys are typed and whose other keys are kept as they are."""

    model_config = ConfigDict(extra="allow")

    def to_dict(self) -> dict:
        """The JSON object: the keys that were set (read from a file or given when built), in their order."""
        return self.model_dump(exclude_unset=True)


class FileRecord(Record):
    """A record that is a file of its own, named :attr:`FILE` in a run folder."""

    FILE: ClassVar[str]
    REQUIRED: ClassVar[tuple[str, ...]] = ()  # keys without which the file is not this record

    @classmethod
    def path(cls, run_dir: str | Path) -> Path:
        """Where this record lives in a run folder."""
        return Path(run_dir) / cls.FILE

    @classmethod
    def parse(cls, data, source: str | Path):
        """The record of a JSON value read from ``source``; a one-line error naming it when it does not fit."""
        missing = [k for k in cls.REQUIRED if not isinstance(data, dict) or k not in data]
        if not isinstance(data, dict) or missing:
            raise AttnEditError(f"{source} lacks {', '.join(missing) or 'a JSON object'}; re-run the command that writes it")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "its top level"
            raise AttnEditError(f"{source} does not have the layout attnedit writes ({where}: {first['msg']}); re-run the command that writes it") from None

    @classmethod
    def read(cls, path: str | Path):
        """The record in the file ``path`` (a run folder: its :attr:`FILE`), or None when there is none."""
        path = Path(path)
        if path.is_dir():
            path = cls.path(path)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
            raise AttnEditError(f"{path} is not valid JSON ({where}); re-run the command that writes it") from None
        return cls.parse(data, path)

    def write(self, path: str | Path) -> Path:
        """Write the record to ``path`` (a run folder: its :attr:`FILE`), atomically."""
        path = Path(path)
        return write_json(self.path(path) if path.is_dir() else path, self.to_dict())


# ------------------------------------------------------------------------------------------ pieces


class KVSeries(Record):
    contexts: list[int]
    bytes_per_token: list[Number]


class KVFigures(Record):
    """KV bytes per token of a model and its teacher by context (``summary.json``'s and ``bench.json``'s ``kv``)."""

    dtype: str | None = None  # absent in files written before the dtype was named: bf16 then
    student: KVSeries | None = None
    teacher: KVSeries | None = None
    ratio: list[Number | None] = []


class Losses(Record):
    """Held-out KL(teacher || student) and both cross-entropies."""

    kl: float
    student_ce: float | None = None
    teacher_ce: float | None = None
    seq_len: int | None = None  # tokens a held-out block


class StageSummary(Record):
    """What one stage did: steps, tokens, time, speed, memory and its last logged step (``final``)."""

    steps: int
    tokens: int
    wall_s: float | None = None
    final: dict[str, Any] = {}
    tok_s: float | None = None
    teacher_fwd_tok_s: float | None = None
    ratio: float | None = None
    peak_memory_bytes: int | None = None
    est_memory_bytes: int | None = None
    compiled: bool | None = None
    profile: dict[str, Any] | None = None


class TaskResult(Record):
    """One task's metrics for the student and the teacher, and student / teacher."""

    student: dict[str, Number | None] | None = None
    teacher: dict[str, Number | None] | None = None
    ratio: dict[str, Number | None] | None = None


class PerplexityWindows(Record):
    max_length: int | None = None
    stride: int | None = None
    max_tokens: int | None = None
    contexts: list[int] = []
    strides: list[int] = []


class EngineFigures(Record):
    """One engine's figures in one bench cell (see :mod:`attnedit.eval.bench`)."""

    ttft_ms: float | None = None
    step_ms: float | None = None
    decode_tok_s: float | None = None
    hbm_bound_ms: float | None = None
    step_over_bound: float | None = None
    peak_mem_bytes: int | None = None
    kv_bytes_measured: int | None = None
    kv_bytes_analytic: int | None = None
    kv_tokens: int | None = None
    bytes_per_step: int | None = None
    compile_s: float | None = None
    profile: dict[str, Any] | None = None
    prefill_profile: dict[str, Any] | None = None


class BenchCell(Record):
    """One (batch, context) of a bench: each engine's figures (null: did not fit, or not run) and the ratios."""

    batch: int
    context: int
    student: EngineFigures | None = None
    teacher: EngineFigures | None = None
    teacher_stock: EngineFigures | None = None
    ratio: dict[str, float | None] = {}
    ratio_stock: dict[str, float | None] = {}
    largest_batch: dict[str, int] | None = None


class CapacityCell(Record):
    """One engine's serving capacity at a context: the largest batch it serves on the device (caches, weights and
    one sequence's prefill at once), the KV-only limit, and its decode figures at that batch (null: none fit)."""

    context: int
    largest_batch: int
    kv_only_limit: int | None = None
    cache_bytes_per_sequence: int | None = None
    kv_tokens: int | None = None
    weight_bytes: int | None = None
    memory_bytes: int | None = None
    step_ms: float | None = None
    decode_tok_s: float | None = None
    peak_mem_bytes: int | None = None
    hbm_bound_ms: float | None = None  # absent in files written before the capacity cells had it
    step_over_bound: float | None = None


class CapacityRow(Record):
    """One context of ``bench --capacity``: the student's and the teacher's cells, and the student over the
    teacher, each at its own largest batch."""

    context: int
    student: CapacityCell | None = None
    teacher: CapacityCell | None = None
    ratio: dict[str, float | None] = {}


# ------------------------------------------------------------------------------------------ files


class Summary(FileRecord):
    """``summary.json``: what ``convert`` trained and the KV figures of the saved model."""

    FILE: ClassVar[str] = "summary.json"

    teacher: str | None = None
    target: str | None = None
    edited_layers: list[int] = []
    full_layers: list[int] | None = None
    full_heads: list[list[int]] | None = None  # [layer, KV head] kept full inside sliding layers (GateSWA)
    heldout_before: Losses | None = None
    stage1: StageSummary | None = None
    stage2: StageSummary | None = None
    heldout_after: Losses | None = None
    # the same held-out text in blocks of the run's longest training sequence, when that is longer than data.seq_len
    # (a windowed student is nearly exact on short blocks; the long ones show what its window loses)
    heldout_before_long: Losses | None = None
    heldout_after_long: Losses | None = None
    wall_s: float | None = None
    model: str | None = None  # the saved model's folder, relative to the run folder (which may move)
    kv: KVFigures | None = None

    def stage(self, n: int) -> StageSummary | None:
        return self.stage1 if n == 1 else self.stage2

    def trained_stages(self) -> dict[int, StageSummary]:
        """The stages that ran at least one step, by number."""
        return {n: st for n in (1, 2) if (st := self.stage(n)) is not None and st.steps}

    def regression(self) -> str | None:
        """A warning when training left the model further from the teacher than its start (held-out KL)."""
        # the figures on the longest training blocks where the run has them (the length it trains at), else data.seq_len's
        long = self.heldout_before_long is not None and self.heldout_after_long is not None
        before, after = (self.heldout_before_long, self.heldout_after_long) if long else (self.heldout_before, self.heldout_after)
        return None if before is None or after is None else heldout_regression(before.kl, after.kl)


def heldout_regression(before: float, after: float) -> str | None:
    """What to say when the held-out KL rose in training (``after > before``), else None."""
    if not after > before:
        return None
    return (
        f"training raised the held-out KL from {before:.4g} to {after:.4g}: the trained model is further from the teacher "
        "than its start; lower the stages' lr, and see stage 1's layer_rel_err in summary.json for the layers that diverged"
    )


class Quality(FileRecord):
    """``eval.json``: each task's metrics for the student and its teacher on the same data."""

    FILE: ClassVar[str] = "eval.json"
    REQUIRED: ClassVar[tuple[str, ...]] = ("tasks",)

    model: str | None = None
    teacher: str | None = None
    tasks: dict[str, TaskResult]
    limit: int | None = None
    num_fewshot: int | None = None
    perplexity: PerplexityWindows | None = None
    device: str | None = None
    dtype: str | None = None


class Passkey(FileRecord):
    """``passkey.json``: retrieval accuracy per (context, depth) over ``trials`` keys, student and teacher."""

    FILE: ClassVar[str] = "passkey.json"
    REQUIRED: ClassVar[tuple[str, ...]] = ("contexts", "depths", "trials")

    model: str | None = None
    teacher_model: str | None = None
    contexts: list[int]
    depths: list[float]
    trials: int
    filler: str = "same"  # absent in files written before filler could vary: the same filler
    student: list[list[float]] | None = None
    teacher: list[list[float]] | None = None

    @model_validator(mode="after")
    def _grids_fit(self):
        for name in ("student", "teacher"):
            grid = getattr(self, name)
            if grid is not None and (len(grid) != len(self.contexts) or any(len(row) != len(self.depths) for row in grid)):
                raise ValueError(f"the {name} grid is not one row of {len(self.depths)} depths per context")
        return self

    def grid(self, name: str) -> dict[int, dict[float, float]]:
        """``name``'s accuracy by context, then by depth ({} when the file has no such grid)."""
        rows = getattr(self, name) or []
        return {c: dict(zip(self.depths, row)) for c, row in zip(self.contexts, rows)}


class Bench(FileRecord):
    """``bench.json``: per (batch, context) cell the engines' figures, and the KV figures at the bench's contexts."""

    FILE: ClassVar[str] = "bench.json"
    REQUIRED: ClassVar[tuple[str, ...]] = ("runs", "kv")

    model: str | None = None
    teacher: str | None = None
    device: str | None = None
    dtype: str | None = None
    decode_tokens: int | None = None
    repeats: int | None = None
    timing: str | None = None
    engines: dict[str, str] = {}
    copy_bandwidth_bytes_s: float | None = None
    kv: KVFigures
    runs: list[BenchCell]
    benched_with: list[str] | None = None
    partial: bool | None = None
    capacity: list[CapacityRow] | None = None


RESULT_FILES: tuple[type[FileRecord], ...] = (Quality, Passkey, Bench)  # made from a saved model, after training


def read_any(path: str | Path) -> FileRecord | None:
    """The record in ``path`` chosen by the file's name (``summary.json``, ``eval.json``, ...), None if absent."""
    by_name = {cls.FILE: cls for cls in (Summary, *RESULT_FILES)}
    name = Path(path).name
    if name not in by_name:
        raise AttnEditError(f"{path}: not a result file attnedit writes ({', '.join(by_name)})")
    return by_name[name].read(path)


__all__ = [
    "Bench",
    "BenchCell",
    "EngineFigures",
    "FileRecord",
    "KVFigures",
    "KVSeries",
    "Losses",
    "Passkey",
    "PerplexityWindows",
    "Quality",
    "RESULT_FILES",
    "Record",
    "StageSummary",
    "Summary",
    "TaskResult",
    "read_any",
]
