"""``attnedit report``: a run folder's quality, efficiency and training figures as Markdown and PNGs, or
several run folders side by side (``compare``)."""

from .build import build_report
from .compare import compare_runs

__all__ = ["build_report", "compare_runs"]
