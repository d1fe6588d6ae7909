"""Writing checkpoints others can load: Hugging Face folders with remote code, and stock formats that
transformers, vLLM and SGLang load natively (DeepSeek-V3 for MLA; Ministral/Qwen2/Qwen3/Qwen3-MoE with
per-layer sliding windows for GateSWA without gate or sinks), each with a parity check (``check.py``)."""

from .hf import AUTO_MAP, save_edited

__all__ = ["AUTO_MAP", "save_edited"]
