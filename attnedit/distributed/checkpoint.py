"""One process's training checkpoints (the :class:`~attnedit.distributed.Parallelism` of one process):
written atomically, found again after any crash, pruned only once superseded. Sharded runs write DCP
folders instead (:mod:`.dcp`), under the same names and in the same folder.

A checkpoint is one ``torch.save`` file ``checkpoints/stage{S}-step{N:06d}.pt`` holding the trained
weights, optimizer state, learning-rate state, data-stream position, RNG states and the run's summary
so far. It is written to a temporary file in the same folder, flushed to disk and renamed into
place, so a checkpoint file either is complete or does not exist; a failed write (a full disk)
leaves the previous checkpoints untouched and no temporary file behind.

Each checkpoint has a sidecar ``<name>.sha256`` holding the sha256 of its bytes, written before the
checkpoint is renamed into place. Loading verifies it: a corrupt, truncated or zero-length checkpoint
(or one holding non-finite weights) is skipped for the newest good one, and when checkpoints exist
but none is good, resuming stops with a one-line error instead of silently starting over.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import AttnEditError
from ..io import remove_temp_files, sha256_of, temp_path, write_error_text, write_errors
from ..results import CHECKPOINT_DIR, list_checkpoints


def checkpoint_path(run_dir: Path, stage: int, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"stage{stage}-step{step:06d}.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(run_dir: Path, state: dict, keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``state['stage']``/``state['step']`` with its
    checksum; keep the newest ``keep``."""
    out = checkpoint_path(run_dir, state["stage"], state["step"])
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out.parent)
    tmp = temp_path(out)
    side = checksum_path(out)
    side_tmp = temp_path(side)
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        with open(side_tmp, "w") as fh:
            fh.write(f"{sha256_of(tmp)}  {out.name}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(side_tmp, side)
        os.replace(tmp, out)
    except write_errors() as e:
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)
        if not out.exists():
            side.unlink(missing_ok=True)
        previous = list_checkpoints(run_dir)
        kept = f"the last good checkpoint {previous[-1].name} is intact" if previous else "no earlier checkpoint exists"
        error = AttnEditError(
            f"could not write checkpoint {out.name} in {out.parent}: {write_error_text(e)}; {kept}; "
            f"free disk space, then run: attnedit convert {run_dir} --resume"
        )
        error.resumable = True  # the run folder stays, whatever it holds
        raise error from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
    return out


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.get("model", {}).values() if t.is_floating_point())


def read_checkpoint(path: Path) -> dict:
    """Load one checkpoint after checking its sha256 (a checkpoint without a sidecar, written by an older
    attnedit, is loaded unverified); raises ValueError saying what is wrong with it."""
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    side = checksum_path(path)
    if side.is_file():
        expected = side.read_text().split()[:1]
        if not expected or sha256_of(path) != expected[0]:
            raise ValueError("its sha256 does not match the checksum written with it (corrupt or truncated)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError("not an attnedit checkpoint")
    if not _finite(state):
        raise ValueError("its weights hold non-finite values")
    return state


def load_latest(run_dir: Path, accept: Callable[[Path], bool] | None = None, required: bool = True) -> dict | None:
    """The newest good checkpoint (among those ``accept`` allows); bad ones are skipped with a note.

    ``None`` when there is no checkpoint at all. When checkpoints exist but none is good: a one-line
    AttnEditError if ``required``, else ``None``.
    """
    paths = [p for p in list_checkpoints(run_dir) if accept is None or accept(p)]
    reasons = []
    for path in reversed(paths):
        try:
            return read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file means: try the previous one
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reasons.append(f"{path.name}: {reason}")
            print(f"attnedit: skipping unreadable checkpoint {path.name}: {reason}", file=sys.stderr)
    if paths and required:
        raise AttnEditError(
            f"no good checkpoint in {Path(run_dir) / CHECKPOINT_DIR} ({'; '.join(reasons[:2])}); "
            f"the run cannot continue: start it again with another --out (or remove {run_dir})"
        )
    return None
