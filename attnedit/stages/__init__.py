"""Progressive distillation: stage 1 (layer-wise teacher forcing), stage 2 (model-level KD), the shared
training loop, checkpoints, the ``--dry-run`` plan, and ``convert`` which runs a recipe end to end.

``convert.py`` reads top to bottom: edit -> stage 1 -> stage 2 -> held-out eval -> save."""

from .convert import convert
from .format import format_plan, format_summary
from .plan import make_plan

__all__ = ["convert", "format_plan", "format_summary", "make_plan"]
