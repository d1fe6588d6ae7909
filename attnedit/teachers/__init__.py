"""Loading teachers and edited models: hub ids, local folders, GGUF files, the smollm2-135m alias."""

from ..paths import cache_root
from .load import SMOLLM2_ALIAS, load_config, load_model, load_tokenizer, local_path, resolve, smollm2_gguf

__all__ = ["SMOLLM2_ALIAS", "cache_root", "load_config", "load_model", "load_tokenizer", "local_path", "resolve", "smollm2_gguf"]
