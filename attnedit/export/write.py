"""Writing a stock transformers checkpoint (no remote code) from weights the exporters computed."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import AttnEditError
from ..io import atomic_dir, check_free


def write_stock(model, model_cls, config, state: dict, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Build ``model_cls(config)`` on the meta device, assign ``state`` (every weight it expects, nothing
    else), cast to ``model``'s dtype and save it, with the tokenizer and generation config, atomically."""
    out = Path(out_dir)
    check_free(out, overwrite, "choose another folder or pass --overwrite")
    dtype = next(model.parameters()).dtype
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    with torch.device("meta"):
        stock = model_cls(config)
    expected = set(stock.state_dict())
    missing = expected - set(state) - tied
    unexpected = set(state) - expected
    if missing or unexpected:
        raise AttnEditError(
            f"internal: {model_cls.__name__} expects weights the export lacks {sorted(missing)[:3]} "
            f"or does not know {sorted(unexpected)[:3]}; please report this"
        )
    stock.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        stock.tie_weights()
    stock.to(dtype)
    with atomic_dir(out) as tmp:
        stock.generation_config = model.generation_config
        stock.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
