"""Progressive distillation: the conversion context and stage 0 (``context.py``), stage 1 (layer-wise teacher
forcing), stage 2 (model-level KD), each a :class:`~attnedit.stages.base.Stage`; the shared training loop, the
``--dry-run`` plan and the stages fitted to the GPU, and ``convert`` which runs a recipe end to end.

``convert.py`` reads top to bottom: edit -> stage 1 -> stage 2 -> held-out eval -> save."""

from .convert import convert
from .format import format_plan, format_summary
from .plan import make_plan

__all__ = ["convert", "format_plan", "format_summary", "make_plan"]
