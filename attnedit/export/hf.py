"""Save an edited model as an ordinary Hugging Face checkpoint that loads without attnedit.

The folder holds ``model.safetensors``, ``config.json`` with ``auto_map``, the modeling code (the files
of ``attnedit/targets``, and an outside target's own), the teacher's tokenizer, ``attnedit.json`` (what
made it) and ``README.md`` (its model card, ``card.py``), so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works in any environment with
torch and transformers. The folder is written next to its destination and renamed into place, so a
crash never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..io import atomic_dir, check_free
from ..provenance import FILE as PROVENANCE_FILE
from ..provenance import provenance
from ..targets import REMOTE_CODE_FILES

AUTO_MAP = {
    "AutoConfig": "configuration_attnedit.AttnEditConfig",
    "AutoModelForCausalLM": "modeling_attnedit.AttnEditForCausalLM",
}
TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"


def save_edited(model, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False, recipe=None, teacher: str | None = None) -> Path:
    """Write ``model`` (an ``AttnEditForCausalLM``) and ``tokenizer`` to ``out_dir`` atomically, with
    ``attnedit.json``: attnedit's version, the target settings and (from ``convert``) the resolved ``recipe``,
    and a model card naming ``teacher`` (or the recipe's)."""
    from ..surgery.api import code_files
    from .card import CARD, model_card

    out = Path(out_dir)
    check_free(out, overwrite)
    with atomic_dir(out) as tmp:
        model.config.auto_map = dict(AUTO_MAP)
        model.save_pretrained(tmp)
        for name in REMOTE_CODE_FILES:
            shutil.copy2(TARGETS_DIR / name, tmp / name)
        for path in code_files(model.config):  # an outside target's attention
            shutil.copy2(path, tmp / path.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance(recipe, model.config.edit), indent=2) + "\n")
        (tmp / CARD).write_text(model_card(model.config, teacher, recipe))
    return out
