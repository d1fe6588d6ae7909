"""attnedit: convert a trained LLM's attention to a cheaper architecture (MLA, GateSWA) by distillation."""

__version__ = "0.1.0"

from .errors import AttnEditError

__all__ = ["AttnEditError", "__version__"]
