"""Training checkpoints: written atomically, found again after any crash, pruned only once superseded.

A checkpoint is one ``torch.save`` file ``checkpoints/stage{S}-step{N:06d}.pt`` holding the trained
weights, optimizer state, learning-rate state, data-stream position, RNG states and the run's summary
so far. It is written to a temporary file in the same folder, flushed to disk and renamed into
place, so a checkpoint file either is complete or does not exist; a failed write (a full disk)
leaves the previous checkpoints untouched.
"""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path

import torch

from ..errors import AttnEditError

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^stage(\d)-step(\d{6,})\.pt$")


def checkpoint_path(run_dir: Path, stage: int, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"stage{stage}-step{step:06d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint files, oldest first (by stage, then step)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = []
    for p in folder.glob("stage*-step*.pt") if folder.is_dir() else []:
        m = _NAME.match(p.name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2))), p))
    return [p for _, p in sorted(found)]


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


def save_checkpoint(run_dir: Path, state: dict, keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``state['stage']``/``state['step']``; keep the newest ``keep``."""
    out = checkpoint_path(run_dir, state["stage"], state["step"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        previous = list_checkpoints(run_dir)
        kept = f"the last good checkpoint {previous[-1].name} is intact" if previous else "no earlier checkpoint exists"
        raise AttnEditError(
            f"could not write checkpoint {out.name} in {out.parent}: {e.strerror or e}; {kept}; "
            f"free disk space, then run: attnedit convert {run_dir} --resume"
        ) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return out


def load_latest(run_dir: Path) -> dict | None:
    """The newest checkpoint that loads; unreadable ones (a disk error after the rename) are skipped with a note."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file means: try the previous one
            print(f"attnedit: skipping unreadable checkpoint {path.name}: {str(e).splitlines()[0]}", file=sys.stderr)
    return None
