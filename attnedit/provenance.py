"""What made a checkpoint: attnedit's version and the resolved settings, saved beside every checkpoint
(``attnedit.json`` in a model folder, an ``attnedit`` entry in a training checkpoint), so that any
checkpoint says how to make it again (as LitGPT's ``hyperparameters.yaml`` does)."""

from __future__ import annotations

import dataclasses

import torch
import transformers

from . import __version__

FILE = "attnedit.json"


def provenance(recipe=None, edit: dict | None = None) -> dict:
    """``recipe``: the resolved recipe of a ``convert`` run (None for ``attnedit edit``); ``edit``: the
    model config's target, resolved target settings and edited layers."""
    return {
        "attnedit_version": __version__,
        "torch_version": str(torch.__version__),  # a TorchVersion would not load with weights_only
        "transformers_version": transformers.__version__,
        "edit": edit,
        "recipe": dataclasses.asdict(recipe) if recipe is not None else None,
    }
