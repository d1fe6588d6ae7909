"""Progressive distillation: stage 1 (layer-wise teacher forcing), stage 2 (model-level KD), the shared
training loop, checkpoints, and ``convert`` which runs a recipe end to end."""

from .convert import convert, format_plan, format_summary, make_plan

__all__ = ["convert", "format_plan", "format_summary", "make_plan"]
