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


def all_formats() -> dict[str, str]:
    """Every export format with its one-line description (built-in ones, then outside targets')."""
    from ..surgery.api import TARGETS, get_target

    out = dict(FORMATS)
    for name in TARGETS:
        for fmt, text in get_target(name).exports.items():
            out.setdefault(fmt, text)
    return out


FORMATS = {
    "stock": "the model's stock format: deepseek_v3 for MLA, the family's sliding-window format for GateSWA, teacher for GQA",
    "deepseek_v3": "all-MLA models: stock DeepSeek-V3 (transformers without remote code, vLLM, SGLang)",
    "ministral": "GateSWA with gate=none, sink=0, Llama/Mistral/Ministral teachers: stock Ministral with layer_types",
    "qwen2": "GateSWA with gate=none, sink=0, Qwen2 (or Llama/Mistral, zero q/k/v biases): stock Qwen2 with layer_types",
    "qwen3": "GateSWA with gate=none, sink=0, Qwen3 teachers: stock Qwen3 with layer_types (transformers only)",
    "qwen3_moe": "GateSWA with gate=none, sink=0, full_layers=none, Qwen3-MoE teachers: stock Qwen3-MoE",
    "gemma2": "GateSWA with gate=none, sink=0, one window, Gemma 2 teachers: stock Gemma 2 with layer_types",
    "gemma3_text": "GateSWA with gate=none, sink=0, one window, Gemma 3 teachers: stock Gemma 3 (text) with layer_types",
    "olmo3": "GateSWA with gate=none, sink=0, one window, OLMo 3 teachers: stock OLMo 3 with layer_types",
    "teacher": "GQA models: the teacher's own stock architecture with fewer KV heads (no remote code)",
    "hf": "any model: Hugging Face folder with attnedit's remote code (what convert writes)",
}


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


__all__ = ["AUTO_MAP", "FORMATS", "ExportSettings", "all_formats", "save_edited"]
