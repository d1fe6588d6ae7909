"""The finished pieces of a long evaluation, kept on disk as each one is done, so that an evaluation a time limit
or a signal stopped goes on where it stopped: ``eval.progress.json`` beside the ``eval.json`` it will become
(``passkey.progress.json`` beside ``passkey.json``). Layout::

    {"key": {...what the pieces depend on: the models' files, the settings...},
     "pieces": {GROUP: {NAME: value}}}     # e.g. {"student": {"wikitext2@2048": {...}}, "teacher": {...}}

A file whose key is not the running evaluation's (other settings, other weights: their files' sizes and times), or
that attnedit did not write, is not used; it is replaced by the running evaluation's first piece.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import write_json

WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt")


def progress_path(result_file: str | Path) -> Path:
    """Where an evaluation that ends in ``result_file`` keeps its finished pieces: ``eval.json`` -> ``eval.progress.json``."""
    result_file = Path(result_file)
    return result_file.with_name(f"{result_file.stem}.progress.json")


def weights_stamp(name: str | None) -> list | None:
    """What tells one model's files from another's on disk: name, size and modification time of a local folder's
    config and weights (or of a local file); None for a hub id or an alias."""
    if name is None:
        return None
    path = Path(name).expanduser()
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.name == "config.json" or f.suffix in WEIGHTS) if path.is_dir() else []
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files] or None


def models_key(model: str, teacher: str | None) -> dict:
    """The part of a progress key that names the two models and stamps their files (:func:`weights_stamp`)."""
    return {"model": model, "teacher": teacher, "model_files": weights_stamp(model), "teacher_files": weights_stamp(teacher)}


def read_kept(path: str | Path) -> tuple[object, dict]:
    """(key, pieces) of the progress file at ``path`` as written (its groups unchecked); ``OSError`` or
    ``ValueError`` where it cannot be read or is not a JSON object with a ``pieces`` object."""
    kept = json.loads(Path(path).read_text())
    if not isinstance(kept, dict) or not isinstance(kept.get("pieces"), dict):
        raise ValueError(f"{path} is not a JSON object with a 'pieces' object")
    return kept.get("key"), kept["pieces"]


class Progress:
    """The pieces kept at ``path`` (None: kept in memory only) for the evaluation described by ``key``."""

    def __init__(self, path: str | Path | None, key: dict):
        self.path = Path(path) if path is not None else None
        self.key = json.loads(json.dumps(key))  # as it reads back from the file
        self.pieces: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            try:
                key, pieces = read_kept(self.path)
            except (OSError, ValueError):
                key, pieces = None, {}
            if key == self.key:
                self.pieces = {group: dict(done) for group, done in pieces.items() if isinstance(done, dict)}

    def done(self, group: str) -> dict:
        """The pieces of ``group`` finished so far, by name."""
        return self.pieces.setdefault(group, {})

    def put(self, group: str, name: str, value) -> None:
        """Keep one finished piece (and write the file at once)."""
        self.done(group)[name] = value
        if self.path is not None:
            write_json(self.path, {"key": self.key, "pieces": self.pieces})

    def close(self) -> None:
        """Remove the file: its pieces are in the written result."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
