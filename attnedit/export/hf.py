"""Save an edited model as an ordinary Hugging Face checkpoint that loads without attnedit.

The folder holds ``model.safetensors``, ``config.json`` with ``auto_map``, the modeling code (the files
of ``attnedit/targets``), the teacher's tokenizer and ``attnedit.json`` (what made it), so
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


def save_edited(model, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False, recipe=None) -> Path:
    """Write ``model`` (an ``AttnEditForCausalLM``) and ``tokenizer`` to ``out_dir`` atomically, with
    ``attnedit.json``: attnedit's version, the target settings and (from ``convert``) the resolved ``recipe``."""
    out = Path(out_dir)
    check_free(out, overwrite)
    with atomic_dir(out) as tmp:
        model.config.auto_map = dict(AUTO_MAP)
        model.save_pretrained(tmp)
        for name in REMOTE_CODE_FILES:
            shutil.copy2(TARGETS_DIR / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance(recipe, model.config.edit), indent=2) + "\n")
    return out
