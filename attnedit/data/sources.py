"""Finding data files and reading them as a stream of document pieces, never a whole file at once.

A *piece* is a document, or a slice of one longer than ``MAX_PIECE_CHARS``: ``(text, ends_document)``.
Pieces are never empty, so a position ``(file, piece index, token offset)`` is enough to resume reading.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import AttnEditError
from .config import DataConfig

MAX_PIECE_CHARS = 100_000  # longer documents are tokenised in slices of about this size
_REPO = Path(__file__).resolve().parents[2]
_KINDS = {".txt": "text", ".raw": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
_COMPRESSED = {".gz": gzip.open, ".xz": lzma.open}
SUPPORTED = ".txt, .raw, .jsonl (each also .gz/.xz) and .parquet"


@dataclass(frozen=True)
class DatasetSource:
    """A Hugging Face ``datasets`` dataset standing in for the files (``data.dataset``)."""

    name: str
    split: str

    def __str__(self) -> str:
        return f"data.dataset {self.name!r} split {self.split!r}"

    def load(self):
        """The split as a memory-mapped Arrow ``Dataset`` (rows are read on demand)."""
        if importlib.util.find_spec("datasets") is None:
            raise AttnEditError("data.dataset needs the datasets package: pip install datasets")
        import datasets

        try:
            if Path(self.name).expanduser().is_dir():
                ds = datasets.load_from_disk(str(Path(self.name).expanduser()))
            else:
                ds = datasets.load_dataset(self.name, split=self.split)
        except (OSError, ValueError) as e:
            raise AttnEditError(
                f"cannot load data.dataset {self.name!r} ({str(e).splitlines()[0]}); give a save_to_disk folder or a dataset cached offline"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise AttnEditError(f"data.dataset {self.name!r} has no split {self.split!r}; set data.dataset_split to one of: {', '.join(ds)}")
            ds = ds[self.split]
        return ds


Source = Path | DatasetSource


def kind_of(path: Source) -> str:
    """'text', 'jsonl', 'parquet' (from the suffix; a .gz/.xz outer suffix is looked through) or 'dataset'."""
    if isinstance(path, DatasetSource):
        return "dataset"
    suffixes = path.suffixes[-2:] if path.suffix in _COMPRESSED else path.suffixes[-1:]
    kind = _KINDS.get(suffixes[0] if suffixes else "")
    if kind is None or (kind == "parquet" and path.suffix in _COMPRESSED):
        raise AttnEditError(f"data file {path} has an unsupported type; use {SUPPORTED}")
    return kind


def open_text(path: Path) -> TextIO:
    """Open a (possibly gzip/xz compressed) text file for streaming; undecodable bytes become U+FFFD."""
    opener = _COMPRESSED.get(path.suffix)
    if opener is not None:
        return opener(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _candidates(entry: str) -> list[Path]:
    """``entry`` relative to the working directory, then to the repo root (absolute paths as given)."""
    p = Path(entry).expanduser()
    return [p] if p.is_absolute() else [p, _REPO / p]


def resolve_files(cfg: DataConfig) -> list[Path]:
    """Expand globs in order (each glob's matches sorted), drop duplicates; no content checks."""
    out: dict[Path, None] = {}
    for entry in cfg.files:
        entry = str(entry)
        if any(c in entry for c in "*?["):
            for base in _candidates(entry):
                hits = sorted(Path(h) for h in glob.glob(str(base), recursive=True) if Path(h).is_file())
                if hits:
                    break
            else:
                raise AttnEditError(f"data.files: {entry!r} matches no file; check the path or glob (relative paths start at the working directory)")
        else:
            hits = [next((c for c in _candidates(entry) if c.exists()), Path(entry))]
            if not hits[0].exists():
                raise AttnEditError(f"data file {entry} does not exist; fix data.files")
            if hits[0].is_dir():
                raise AttnEditError(f"data file {entry} is a folder; name its files or a glob, e.g. {entry.rstrip('/')}/*.jsonl")
        out.update((h.resolve(), None) for h in hits)
    return list(out)


def _require_pyarrow(path: Path):
    if importlib.util.find_spec("pyarrow") is None:
        raise AttnEditError(f"reading {path.name} needs pyarrow: pip install pyarrow (or pip install 'attnedit[parquet]')")
    import pyarrow.parquet as pq

    return pq


def _check_is_text(path: Path, probe: int = 1 << 16) -> None:
    """A .txt/.jsonl file (compressed or not) must start as UTF-8 text: NUL bytes or undecodable bytes in
    its first 64 KiB mean a binary file, which would otherwise train on replacement characters."""
    opener = _COMPRESSED.get(path.suffix)
    try:
        with opener(path, "rb") if opener is not None else open(path, "rb") as f:
            head = f.read(probe)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise AttnEditError(f"cannot read data file {path}: {e}; is it a valid {path.suffix} file?") from None
    # a multi-byte character may be cut at the end of the probe: up to 3 bytes of it may be left out
    cuts = range(4) if len(head) == probe else range(1)
    decodes = any(_decodes(head[: len(head) - cut]) for cut in cuts)
    if not decodes or b"\x00" in head:
        raise AttnEditError(f"data file {path} is not UTF-8 text (binary content at its start); remove it from data.files")


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _check_one(path: Source, cfg: DataConfig) -> None:
    """Cheap checks that need at most one record: readable, not empty, has the text field."""
    kind = kind_of(path)
    if kind == "dataset":
        ds = path.load()
        if cfg.text_field not in ds.column_names:
            raise AttnEditError(f"{path} has no column {cfg.text_field!r}; set data.text_field to one of: {', '.join(ds.column_names)}")
        if len(ds) == 0:
            raise AttnEditError(f"{path} is empty; choose another data.dataset_split")
        return
    if path.stat().st_size == 0:
        raise AttnEditError(f"data file {path} is empty; remove it from data.files")
    if kind == "parquet":
        meta = _require_pyarrow(path).ParquetFile(path)
        names = meta.schema_arrow.names
        if cfg.text_field not in names:
            raise AttnEditError(f"{path} has no column {cfg.text_field!r}; set data.text_field to one of: {', '.join(names)}")
        if meta.metadata.num_rows == 0:
            raise AttnEditError(f"data file {path} is empty (no rows); remove it from data.files")
        return
    _check_is_text(path)
    try:
        with open_text(path) as f:
            if kind == "text":
                if not f.read(1):
                    raise AttnEditError(f"data file {path} is empty; remove it from data.files")
                return
            first = next((line for line in f if line.strip()), None)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise AttnEditError(f"cannot read data file {path}: {e}; is it a valid {path.suffix} file?") from None
    if first is None:
        raise AttnEditError(f"data file {path} holds no records; remove it from data.files")
    _field(_parse(first, path, 1), cfg.text_field, path, 1)


def check_files(cfg: DataConfig) -> list[Source]:
    """Resolve ``cfg.files`` and check each file; a one-line AttnEditError if none, missing, empty or unreadable.

    With ``cfg.dataset`` set, the files are ignored and the one source is that dataset.
    """
    cfg.validate()
    files = [DatasetSource(cfg.dataset, cfg.dataset_split)] if cfg.dataset is not None else resolve_files(cfg)
    for path in files:
        _check_one(path, cfg)
    return files


def _parse(line: str, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise AttnEditError(f"{path}:{lineno} is not valid JSON ({e.msg}); JSONL needs one JSON object per line") from None
    if not isinstance(record, dict):
        raise AttnEditError(f'{path}:{lineno} is not a JSON object; JSONL needs one object per line, e.g. {{"text": ...}}')
    return record


def _field(record: dict, name: str, path: Path, lineno: int) -> str | None:
    if name not in record:
        raise AttnEditError(f"{path}:{lineno} has no field {name!r}; set data.text_field to one of: {', '.join(map(str, record))}")
    value = record[name]
    if value is not None and not isinstance(value, str):
        raise AttnEditError(f"{path}:{lineno}: field {name!r} holds {type(value).__name__}, not text; set data.text_field to a text field")
    return value


def _slices(text: str) -> Iterator[tuple[str, bool]]:
    """One document as pieces of at most about MAX_PIECE_CHARS, cut after whitespace where possible."""
    while len(text) > MAX_PIECE_CHARS:
        cut = max(text.rfind(" ", 0, MAX_PIECE_CHARS), text.rfind("\n", 0, MAX_PIECE_CHARS)) + 1 or MAX_PIECE_CHARS
        yield text[:cut], False
        text = text[cut:]
    yield text, True


def _text_pieces(f: TextIO, mode: str) -> Iterator[tuple[str, bool]]:
    """Documents of a text file (blank-line paragraphs, lines, or the whole file), in bounded pieces.

    Lines are read at most up to the piece limit, so even a file without newlines streams. One piece
    is held back so that the last piece of a document is known before it is yielded.
    """
    buf: list[str] = []
    size, pending = 0, None
    while True:
        chunk = f.readline(MAX_PIECE_CHARS - size)  # "" only at the end of the file
        blank = mode == "paragraph" and bool(chunk) and not chunk.strip()
        if chunk and not blank:
            buf.append(chunk)
            size += len(chunk)
        ends = not chunk or blank or (mode == "line" and chunk.endswith("\n"))
        if ends or size >= MAX_PIECE_CHARS:
            text = "".join(buf)
            buf, size = [], 0
            if text.strip():
                if pending is not None:
                    yield pending, False
                pending = text
            if ends and pending is not None:
                yield pending, True
                pending = None
        if not chunk:
            return


def _record_pieces(texts: Iterator[str | None]) -> Iterator[tuple[str, bool]]:
    """Pieces of one-document-per-record sources; empty and null records are skipped."""
    for text in texts:
        if text and text.strip():
            yield from _slices(text)


def _jsonl_texts(f: TextIO, path: Path, name: str) -> Iterator[str | None]:
    for lineno, line in enumerate(f, 1):
        if line.strip():
            yield _field(_parse(line, path, lineno), name, path, lineno)


def _column_texts(path: Source, name: str, columns: Iterator[list]) -> Iterator[str | None]:
    row = 0
    for values in columns:
        for value in values:
            row += 1
            if value is not None and not isinstance(value, str):
                raise AttnEditError(f"{path} row {row}: column {name!r} holds {type(value).__name__}, not text; set data.text_field")
            yield value


def _parquet_columns(path: Path, name: str) -> Iterator[list]:
    for batch in _require_pyarrow(path).ParquetFile(path).iter_batches(batch_size=1024, columns=[name]):
        yield batch.column(0).to_pylist()


def _dataset_columns(source: DatasetSource, name: str) -> Iterator[list]:
    for batch in source.load().select_columns([name]).iter(batch_size=1024):
        yield batch[name]


def iter_pieces(path: Source, text_field: str, txt_documents: str) -> Iterator[tuple[str, bool]]:
    """Every non-empty piece of ``path`` in file order, as ``(text, ends_document)``, streamed: records' ``text_field``
    (JSONL, Parquet, datasets), or a text file's documents as ``txt_documents`` says (``DataConfig``'s fields)."""
    kind = kind_of(path)
    if kind in ("parquet", "dataset"):
        columns = (_parquet_columns if kind == "parquet" else _dataset_columns)(path, text_field)
        yield from _record_pieces(_column_texts(path, text_field, columns))
        return
    with open_text(path) as f:
        if kind == "text":
            yield from _text_pieces(f, txt_documents)
        else:
            yield from _record_pieces(_jsonl_texts(f, path, text_field))
