"""``attnedit report``: a run folder's quality, efficiency and training figures as Markdown and PNGs."""

from .build import build_report

__all__ = ["build_report"]
