"""Writing checkpoints others can load: Hugging Face folders with remote code, and stock formats that
transformers, vLLM and SGLang load natively (DeepSeek-V3 for MLA; Ministral/Qwen2/Qwen3/Qwen3-MoE/Gemma/OLMo 3
with per-layer sliding windows for GateSWA without gate or sinks; the teacher's own architecture with fewer KV
heads for GQA), each with a parity check (``check.py``); a model card (``card.py``) in every folder."""

from collections.abc import Sequence
from dataclasses import dataclass

from ..schema import REQUIRED, require, setting
from .hf import AUTO_MAP, save_edited


class _FormatNames(Sequence):
    """The format names: attnedit's own and those of registered outside targets (read when used)."""

    def _names(self) -> list[str]:
        return list(all_formats())

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()


FORMATS = {
    "stock": "the model's stock format: deepseek_v3 for MLA, the family's sliding-window format for GateSWA, teacher for GQA",
    "hf": "any model: Hugging Face folder with attnedit's remote code (what convert writes)",
}


def all_formats() -> dict[str, str]:
    """Every export format with its one-line description: ``stock``, each target's (``Target.exports``), ``hf``."""
    from ..surgery.api import TARGETS, get_target

    out = {"stock": FORMATS["stock"]}
    for name in TARGETS:
        for fmt, text in get_target(name).exports.items():
            out.setdefault(fmt, text)
    out["hf"] = FORMATS["hf"]
    return out


def write_export(model, fmt: str, out, tokenizer=None, overwrite: bool = False):
    """Write ``model`` in stock format ``fmt``: the built-in targets' formats here (DeepSeek-V3, the sliding-window
    formats, the teacher's architecture), an outside target's through its ``Target.export``. Each writer says in
    one line when the model is not one it can write."""
    from ..errors import AttnEditError
    from ..surgery.api import TARGETS, get_target
    from .deepseek import export_deepseek_v3
    from .stock import SWA_FORMATS, export_stock_swa, export_teacher_format

    if fmt == "deepseek_v3":
        return export_deepseek_v3(model, out, tokenizer, overwrite=overwrite)
    if fmt in SWA_FORMATS:
        return export_stock_swa(model, out, fmt, tokenizer, overwrite=overwrite)
    if fmt == "teacher":
        return export_teacher_format(model, out, tokenizer, overwrite=overwrite)
    owner = next((get_target(t) for t in TARGETS if fmt in get_target(t).exports), None)
    if owner is None:
        raise AttnEditError(f"unknown export format {fmt!r}; choose one of: {', '.join(all_formats())}")
    return owner.export(model, fmt, out, tokenizer, overwrite=overwrite)


@dataclass
class ExportSettings:
    """What ``attnedit export`` writes and how it checks it (its flags)."""

    format: str = setting(REQUIRED, "target format (see below)", _FormatNames())
    check: bool = setting(
        True, "reload the export and compare with the model (default: on; float32 on the CPU, so a few seconds for "
        "135M parameters and minutes and 4 bytes/parameter of RAM for billions)",
    )  # fmt: skip
    check_context: int | None = setting(None, "prompt tokens for the check (default: 32 more than the largest window, at least 64)")

    def __post_init__(self):
        require(self, [(self.check_context is None or self.check_context >= 2, "check_context", "must be at least 2 tokens")])


__all__ = ["AUTO_MAP", "FORMATS", "ExportSettings", "all_formats", "save_edited", "write_export"]
