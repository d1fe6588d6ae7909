"""Sharded training checkpoints through ``torch.distributed.checkpoint`` (DCP), atomic and resumable on
another number of ranks: the checkpoint format of the FSDP2 :class:`~attnedit.distributed.Parallelism`.

Layout: ``checkpoints/stage{S}-step{N:06d}.dcp/`` is a DCP folder: every rank writes its shards of the
trained weights and of the AdamW state (``__{rank}_0.distcp`` files, ``.metadata``), and rank 0 adds
``meta.pt``: everything else a resume needs (step, learning-rate state, data position, RNG, metrics
offset, summary, log window), the same fields as a one-process checkpoint, plus the world size. Every
rank writes into ``.stage{S}-step{N:06d}.dcp.tmp``; after a barrier rank 0 writes ``meta.pt``, fsyncs
it and renames the folder into place, so a ``.dcp`` folder is complete or does not exist (a SIGKILL
leaves at most a ``.tmp`` folder, removed by the next save). Rank 0 prunes old ones the same way.

DCP stores each tensor with its global shape and the shards' offsets, so a checkpoint written by N
ranks loads on M ranks (FSDP2's even split over dim 0 is re-cut on load) or in one process as whole
tensors (:func:`read_weights`; ``attnedit.stages.context.export_checkpoint`` writes any checkpoint as a
Hugging Face folder). The trained weights are the student's *owned* weights only: the frozen teacher is
never written (it is the teacher's own checkpoint).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import AttnEditError
from ..results import CHECKPOINT_DIR
from ..results import list_checkpoints as _list
from . import env


def checkpoint_dir(run_dir: Path, stage: int, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"stage{stage}-step{step:06d}.dcp"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished DCP checkpoints (rank 0 wrote ``meta.pt`` last), oldest first (by stage, then step)."""
    return _list(run_dir, ".dcp")


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen (teacher) weights are not ours to load


def _states(model, opt):
    """The DCP state of the trained weights and, once AdamW has taken a step, of its moments.

    Before the first step AdamW has no state, and ``get_state_dict`` would create it by taking a step
    with zero gradients (AdamW's step count 1, which changes the bias correction of the real first
    step); so then only the weights are written, and a restore leaves the optimizer empty as it was.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not opt.state:
        return {"model": get_model_state_dict(model, options=_options())}
    msd, osd = get_state_dict(model, opt, options=_options())
    return {"model": msd, "optim": osd}


def save(run_dir: Path, meta: dict, model, opt, keep: int) -> Path:
    """Write a DCP checkpoint of ``model``'s trained weights and ``opt``'s state, with ``meta`` (the trainer's
    step, data position, RNG, summary...) in rank 0's ``meta.pt``. Collective: every rank calls it at the same step."""
    import torch.distributed.checkpoint as dcp

    meta = {**meta, "format": "dcp", "optimizer": bool(opt.state), "world_size": env.world_size()}
    final = checkpoint_dir(run_dir, meta["stage"], meta["step"])
    tmp = final.with_name(f".{final.name}.tmp")
    if env.is_main():
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(".*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    env.barrier()
    try:
        dcp.save(_states(model, opt), checkpoint_id=str(tmp))
        env.barrier()
        if env.is_main():
            with open(tmp / "meta.pt", "wb") as fh:
                torch.save(meta, fh)
                fh.flush()
                os.fsync(fh.fileno())
            if final.exists():  # the same step saved again after a restart
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        error = AttnEditError(
            f"could not write checkpoint {final.name}: {e.strerror or e}; free disk space, then resume the run "
            f"(torchrun ... -m attnedit convert {run_dir} --resume)"
        )
        error.resumable = True
        raise error from None
    env.barrier()
    return final


def read_meta(path: Path) -> dict:
    state = torch.load(Path(path) / "meta.pt", map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "dcp":
        raise ValueError("not an attnedit DCP checkpoint")
    state["dcp_path"] = str(path)
    state["model"] = {}
    return state


def load_latest(run_dir: Path, accept: Callable[[Path], bool] | None = None, required: bool = True, owned=None) -> dict | None:
    """The newest readable DCP checkpoint's state (without tensors; ``dcp_path`` says where they are).

    With ``owned`` (name, parameter) pairs, ``state['model']`` gets their saved values as whole
    tensors (for weights set before the stage's plan shards them).
    """
    paths = [p for p in list_checkpoints(run_dir) if accept is None or accept(p)]
    reasons = []
    for path in reversed(paths):
        try:
            state = read_meta(path)
        except Exception as e:  # noqa: BLE001 - an unreadable one means: try the previous one
            reasons.append(f"{path.name}: {e}")
            print(f"attnedit: skipping unreadable checkpoint {path.name}: {e}", file=sys.stderr)
            continue
        if owned is not None:
            state["model"] = read_weights(path, owned)
        return state
    if paths and required:
        raise AttnEditError(f"no good checkpoint in {Path(run_dir) / CHECKPOINT_DIR} ({'; '.join(reasons[:2])})")
    return None


def read_weights(path: Path, owned) -> dict[str, torch.Tensor]:
    """The saved trained weights among ``owned``, as whole CPU tensors (in any process count)."""
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    template = {"model": {n: torch.empty(p.shape, dtype=p.dtype) for n, p in owned if f"model.{n}" in stored}}
    dcp.load(template, checkpoint_id=str(path))
    return template["model"]


def restore(model, opt, state: dict) -> None:
    """Load a DCP checkpoint's trained weights and AdamW state into ``model``'s live (sharded) ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict, set_state_dict

    if not state["optimizer"]:  # written before AdamW's first step: the weights alone, and no AdamW state
        opt.state.clear()
        states = {"model": get_model_state_dict(model, options=_options())}
        dcp.load(states, checkpoint_id=state["dcp_path"])
        set_model_state_dict(model, states["model"], options=_options())
        return
    opt.state.clear()
    states = _states(model, opt) if opt.state else None
    if states is None:  # a fresh AdamW: let get_state_dict give it the state's shapes, then load over them
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt, options=_options())
        states = {"model": msd, "optim": osd}
    dcp.load(states, checkpoint_id=state["dcp_path"])
    set_state_dict(model, opt, model_state_dict=states["model"], optim_state_dict=states["optim"], options=_options())
