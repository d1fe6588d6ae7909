"""Writing checkpoints others can load: Hugging Face folders with remote code (more formats to come)."""

from .hf import AUTO_MAP, replace_dir, save_edited

__all__ = ["AUTO_MAP", "replace_dir", "save_edited"]
