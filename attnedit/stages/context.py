"""Stage 0: the conversion context. Load the teacher (frozen), replace its attention, and hand the stages a
:class:`~attnedit.stages.base.Conversion`; and the same student rebuilt from a training checkpoint, written
as an ordinary Hugging Face folder (:func:`export_checkpoint`)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from ..distributed import Parallelism
from ..errors import AttnEditError
from ..recipe import Recipe
from .base import Conversion, owned_parameters
from .plan import check_seq_len, stages, weights_dtype

FULL_LAYERS = "full_layers.json"  # a target's measured choice (Target.choose), e.g. GateSWA's full layers or KV heads


def edit(recipe: Recipe, device: torch.device, run_dir: Path, parallel: Parallelism, measured: dict | None = None) -> tuple[Conversion, dict | None]:
    """Load the teacher (frozen) and replace its attention; the new attention trains in fp32.

    What the target measures on the run's own data before it edits (:meth:`~attnedit.surgery.api.Target.choose`:
    GateSWA's ``full_layers``/``full_heads: auto...``, ``surgery/selection.py``) is measured first by the main
    process (``measured``, from an earlier start of the run, is reused as it is). Returns the context and that
    measurement (None when nothing was measured).
    """
    from ..data import resolve_tokenizer
    from ..data.recall import long_range_blocks
    from ..surgery import edit_model, get_target
    from ..teachers import load_model

    teacher, teacher_tok = load_model(recipe.teacher, dtype=weights_dtype(recipe, device), device=device)
    check_seq_len(recipe, teacher.config)
    tokenizer = resolve_tokenizer(recipe.data, teacher_tok, teacher.config.vocab_size)
    teacher.requires_grad_(False)
    calib = None
    target = get_target(recipe.target)
    if target.calibrated and recipe.target_args.get("init") == "teacher":  # e.g. MLA's factorisation
        calib = calibration_ids(recipe, tokenizer, teacher.config.hidden_size)
    target_args = recipe.target_args
    blocks = lambda seq_len=None: sensitivity_ids(recipe, tokenizer, seq_len)  # noqa: E731
    if measured is None:  # the main process measures; every process builds its choice
        measured = parallel.from_main(lambda: target.choose(teacher, target_args, blocks, long_range=long_range_blocks)[1])
    target_args, measured = target.choose(teacher, target_args, blocks, measured)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    student = edit_model(teacher, recipe.target, target_args, calibration_ids=calib)
    for i in student.config.edit["edited_layers"]:
        student.attentions()[i].float()  # trained weights stay fp32 (AdamW master copies); autocast does the rest
    return Conversion(teacher, student, tokenizer, device, Path(run_dir), parallel), measured


def training_blocks(recipe: Recipe, tokenizer, seq: int, n: int) -> torch.Tensor:
    """The first ``n`` blocks of ``seq`` tokens of the run's own training data (never the held-out documents)."""
    from ..data import BlockStream
    from .base import stage_data

    return BlockStream(stage_data(recipe.data, seq), tokenizer, seed=recipe.seed, prefetch=False).next_batch(n)


def sensitivity_ids(recipe: Recipe, tokenizer, seq_len: int | None = None, n: int = 8) -> torch.Tensor:
    """Blocks for a target's measured choice (GateSWA ``full_layers``/``full_heads: auto...``: ``auto_seq_len``
    tokens each): ``seq_len`` tokens each, by default the run's longest sequence length."""
    return training_blocks(recipe, tokenizer, seq_len or max(s.seq_len for s in stages(recipe)), n)


def calibration_ids(recipe: Recipe, tokenizer, hidden_size: int) -> torch.Tensor:
    """Blocks of the run's own training data for the teacher initialisation of MLA, instead of random token ids
    (``surgery.edit.calibration_blocks``: about eight tokens per hidden dimension)."""
    from ..surgery.edit import calibration_blocks

    seq = min(recipe.data.seq_len, 256)
    return training_blocks(recipe, tokenizer, seq, calibration_blocks(hidden_size, seq))


def export_checkpoint(run_dir: str | os.PathLike, out: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
    """Write a training checkpoint of a run (the newest by default; a ``.pt`` file or a DCP folder) as an
    ordinary Hugging Face folder that ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``
    loads. One process, no GPU needed."""
    from ..data import resolve_tokenizer
    from ..distributed import checkpoint as pt
    from ..distributed import dcp
    from ..export import save_edited
    from ..recipe import load_recipe
    from ..surgery import edit_model, get_target
    from ..teachers import load_model

    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint else ([*pt.list_checkpoints(run_dir), *dcp.list_checkpoints(run_dir)] or [None])[-1]
    if path is None:
        raise AttnEditError(f"{run_dir} has no training checkpoint to export")
    sharded = path.suffix == ".dcp"
    recipe = load_recipe(run_dir / "recipe.yaml")
    state = dcp.read_meta(path) if sharded else pt.read_checkpoint(path)
    wdtype = weights_dtype(recipe, torch.device("cpu"))
    teacher, tok = load_model(recipe.teacher, dtype=wdtype, device=torch.device("cpu"))
    teacher.requires_grad_(False)
    measured = run_dir / FULL_LAYERS
    args = {**recipe.target_args, "init": "random"}  # every trained weight comes from the checkpoint
    if measured.is_file():
        args, _ = get_target(recipe.target).choose(teacher, args, None, json.loads(measured.read_text()))
    student = edit_model(teacher, recipe.target, args)
    for i in student.config.edit["edited_layers"]:
        student.attentions()[i].float()
    next(s for s in stages(recipe) if s.number == state["stage"]).prepare(student, teacher)
    owned = owned_parameters(student, teacher)
    weights = dcp.read_weights(path, owned) if sharded else state["model"]
    missing = [n for n, _ in owned if n not in weights]
    if missing:
        raise AttnEditError(f"{path.name} lacks trained weights such as {missing[0]}")
    with torch.no_grad():
        for n, p in owned:
            p.copy_(weights[n])
    student.to(wdtype)
    tokenizer = resolve_tokenizer(recipe.data, tok, teacher.config.vocab_size)
    return save_edited(student.eval(), out, tokenizer, overwrite=True, recipe=recipe)
