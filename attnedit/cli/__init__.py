"""Command-line interface (``attnedit --help``)."""

from .main import main

__all__ = ["main"]
