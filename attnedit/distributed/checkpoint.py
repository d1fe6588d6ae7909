"""Sharded training checkpoints through ``torch.distributed.checkpoint`` (DCP), atomic, resumable on
another number of ranks, and convertible to an ordinary Hugging Face folder.

Layout: ``checkpoints/stage{S}-step{N:06d}.dcp/`` is a DCP folder: every rank writes its shards of the
trained weights and of the AdamW state (``__{rank}_0.distcp`` files, ``.metadata``), and rank 0 adds
``meta.pt``: everything else a resume needs (step, learning-rate state, data position, RNG, metrics
offset, summary, log window), the same fields as a one-process checkpoint, plus the world size. Every
rank writes into ``.stage{S}-step{N:06d}.dcp.tmp``; after a barrier rank 0 writes ``meta.pt``, fsyncs
it and renames the folder into place, so a ``.dcp`` folder is complete or does not exist (a SIGKILL
leaves at most a ``.tmp`` folder, removed by the next save). Rank 0 prunes old ones the same way.

DCP stores each tensor with its global shape and the shards' offsets, so a checkpoint written by N
ranks loads on M ranks (FSDP2's even split over dim 0 is re-cut on load) or in one process as whole
tensors (:func:`export_hf`). The trained weights are the student's *owned* weights only: the frozen
teacher is never written (it is the teacher's own checkpoint).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import AttnEditError
from . import env

from ..stages.checkpoint import CHECKPOINT_DIR
from ..stages.checkpoint import list_checkpoints as _list


def checkpoint_dir(run_dir: Path, stage: int, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"stage{stage}-step{step:06d}.dcp"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished DCP checkpoints (rank 0 wrote ``meta.pt`` last), oldest first (by stage, then step)."""
    return _list(run_dir, ".dcp", lambda p: (p / "meta.pt").is_file())


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


def save(run, job, opt, step: int, lr_scale: float, restarts: int, window) -> Path:
    """Write this stage's DCP checkpoint (collective: every rank calls it at the same step)."""
    import torch.distributed.checkpoint as dcp

    from ..stages.checkpoint import rng_state

    run.stamp_wall(job.stage)
    meta = {
        "version": 1,
        "format": "dcp",
        "optimizer": bool(opt.state),
        "world_size": env.world_size(),
        "stage": job.stage,
        "step": step,
        "done": step >= job.cfg.steps,
        "lr_scale": lr_scale,
        "restarts": restarts,
        "data": job.stream.state_dict(),
        "rng": rng_state(),
        "metrics_offset": run.metrics.offset(),
        "summary": run.summary,
        "window": window.state_dict() if window is not None else None,
    }
    final = checkpoint_dir(run.dir, job.stage, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if env.is_main():
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(".*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    env.barrier()
    try:
        dcp.save(_states(job.model, opt), checkpoint_id=str(tmp))
        env.barrier()
        if env.is_main():
            with open(tmp / "meta.pt", "wb") as fh:
                torch.save(meta, fh)
                fh.flush()
                os.fsync(fh.fileno())
            if final.exists():  # the same step saved again after a restart
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(run.dir)[: -run.recipe.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        error = AttnEditError(
            f"could not write checkpoint {final.name}: {e.strerror or e}; free disk space, then resume the run "
            f"(torchrun ... -m attnedit convert {run.dir} --resume)"
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
    template = {
        "model": {n: torch.empty(p.shape, dtype=p.dtype) for n, p in owned if f"model.{n}" in stored}
    }
    dcp.load(template, checkpoint_id=str(path))
    return template["model"]


def restore(job, opt, state: dict) -> None:
    """Load a DCP checkpoint's trained weights and AdamW state into the live (sharded) ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict, set_state_dict

    if not state["optimizer"]:  # written before AdamW's first step: the weights alone, and no AdamW state
        opt.state.clear()
        states = {"model": get_model_state_dict(job.model, options=_options())}
        dcp.load(states, checkpoint_id=state["dcp_path"])
        set_model_state_dict(job.model, states["model"], options=_options())
        return
    opt.state.clear()
    states = _states(job.model, opt) if opt.state else None
    if states is None:  # a fresh AdamW: let get_state_dict give it the state's shapes, then load over them
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(job.model, opt, options=_options())
        states = {"model": msd, "optim": osd}
    dcp.load(states, checkpoint_id=state["dcp_path"])
    set_state_dict(job.model, opt, model_state_dict=states["model"], optim_state_dict=states["optim"], options=_options())


def export_hf(run_dir: str | os.PathLike, out: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
    """Write a DCP checkpoint of a run (the newest by default) as an ordinary Hugging Face folder that
    ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` loads. One process, no GPU needed."""
    from ..data import resolve_tokenizer
    from ..export import save_edited
    from ..recipe import load_recipe
    from ..stages import stage2
    from ..stages.convert import owned_parameters, weights_dtype
    from ..surgery import edit_model
    from ..teachers import load_model

    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint else (list_checkpoints(run_dir) or [None])[-1]
    if path is None:
        raise AttnEditError(f"{run_dir} has no DCP checkpoint to export")
    recipe = load_recipe(run_dir / "recipe.yaml")
    meta = read_meta(path)
    wdtype = weights_dtype(recipe, torch.device("cpu"))
    teacher, tok = load_model(recipe.teacher, dtype=wdtype, device=torch.device("cpu"))
    teacher.requires_grad_(False)
    args = {**recipe.target_args, "init": "random"}  # every trained weight comes from the checkpoint
    student = edit_model(teacher, recipe.target, args)
    for i in student.config.edit["edited_layers"]:
        student.attentions()[i].float()
    if meta["stage"] == 2:
        stage2.unshare(student, teacher, recipe.stage2.trainable)
    owned = owned_parameters(student, teacher)
    weights = read_weights(path, owned)
    missing = [n for n, _ in owned if n not in weights]
    if missing:
        raise AttnEditError(f"{path.name} lacks trained weights such as {missing[0]}")
    with torch.no_grad():
        for n, p in owned:
            p.copy_(weights[n])
    student.to(wdtype)
    tokenizer = resolve_tokenizer(recipe.data, tok, teacher.config.vocab_size)
    return save_edited(student.eval(), out, tokenizer, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m attnedit.distributed.checkpoint", description=export_hf.__doc__)
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", help="a stage*-step*.dcp folder (default: the run's newest)")
    a = p.parse_args(argv)
    print(export_hf(a.run_dir, a.out, a.checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
