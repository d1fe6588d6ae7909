"""The models an evaluation compares: edited checkpoints and the teacher they were edited from, loaded together
(bench and passkey), and the one-line refusals of a pair that would mislead (not an edited model, another
teacher, a context longer than a model supports)."""

from __future__ import annotations

import torch

from ..errors import AttnEditError
from .kv import max_context


def load_students(models: list[str], teacher: str, contexts: list[int], device: torch.device, dtype: str):
    """``({folder: student}, teacher, tokenizer)``: edited checkpoints and their teacher on ``device`` in
    ``dtype`` (a name), for bench and passkey. Folders that are not edited models, and contexts longer than
    a model supports, fail in one line before any weight is read."""
    from ..devices import DTYPES
    from ..teachers import load_config, load_model

    for model in models:
        config = load_config(model)
        if getattr(config, "model_type", None) != "attnedit":
            raise AttnEditError(f"{model} is not an edited model; give the output folder of attnedit edit or convert")
        check_contexts(config, contexts, "the model")
    check_contexts(load_config(teacher), contexts, "the teacher")
    students, tokenizer = {}, None
    for model in models:
        students[model], tokenizer = load_model(model, dtype=DTYPES[dtype], device=device)
    reference, _ = load_model(teacher, dtype=DTYPES[dtype], device=device)
    return students, reference, tokenizer


def check_contexts(config, contexts: list[int], name: str) -> None:
    limit = max_context(config)
    too_long = [c for c in contexts if limit and c > limit]
    if too_long:
        raise AttnEditError(f"context {max(too_long)} is longer than {name} supports ({limit} tokens); use shorter --contexts")


def check_pair(student, teacher) -> None:
    """Refuse a teacher that is not the one the student was edited from (the comparison would mislead)."""
    base = getattr(student.config, "base_config", None)
    if not isinstance(base, dict):
        raise AttnEditError("the model to bench is not an edited (attnedit) checkpoint; give the output of attnedit edit/convert")
    t = teacher.config
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if base.get(key) != getattr(t, key, None):
            raise AttnEditError(f"--teacher does not match the model: {key} {getattr(t, key, None)} vs {base.get(key)}; give the teacher it was edited from")
