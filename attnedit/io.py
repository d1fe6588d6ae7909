"""Atomic file and folder writes, the one place that knows how a full disk fails.

Every file attnedit writes that a later run reads (recipes, summaries, JSON results, checkpoints, the
model folder, exports, the dequantised GGUF cache) goes to a temporary name beside its destination
and is renamed into place, so a crash or a full disk never leaves a half-written file where a good
one was. A failed write removes its temporary file and raises one line that says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import AttnEditError


def write_errors() -> tuple[type[BaseException], ...]:
    """What a full disk raises while writing: OSError, or torch's/safetensors' own wrappers of it."""
    errors: tuple[type[BaseException], ...] = (OSError, RuntimeError)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:  # older safetensors
        pass
    return errors


def write_error_text(e: BaseException) -> str:
    """One line for a failed write, whatever raised it."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def temp_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed to ``path``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_temp_files(folder: Path) -> None:
    """Temporary files and folders a killed process left behind (one writer per folder at a time)."""
    for p in folder.glob(".*.tmp-*") if folder.is_dir() else []:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (creating its folder); a failure is one line."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise AttnEditError(f"could not write {path}: {write_error_text(e)}; free disk space and retry") from None
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place; an existing folder is swapped out, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_free(out: Path, overwrite: bool, hint: str = "choose another --out or remove it") -> None:
    if out.exists() and not overwrite and any(out.iterdir()):
        raise AttnEditError(f"{out} already exists and is not empty; {hint}")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; once the block succeeds it becomes ``out``.

    With ``keep_existing`` a folder that appeared at ``out`` meanwhile (another process writing the
    same content-keyed cache) is kept and the temporary one dropped. An ``OSError`` inside the block
    (a full disk) becomes one line saying nothing was replaced; the temporary folder never survives.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if not (keep_existing and out.exists()):
            replace_dir(tmp, out)
    except OSError as e:
        raise AttnEditError(f"could not write {out}: {write_error_text(e)}; nothing was replaced") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_SHA256_CACHE: dict[tuple, str] = {}


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime, ctime) in this process and in
    ``$ATTNEDIT_CACHE/data-sha256.json``, so a resume (or a second load of a GGUF teacher) does not
    read unchanged files again."""
    from .paths import cache_root

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _SHA256_CACHE:
        return _SHA256_CACHE[key]
    store = cache_root() / "data-sha256.json"
    try:
        saved = json.loads(store.read_text())
    except (OSError, ValueError):
        saved = {}
    entry = saved.get(key[0])
    if isinstance(entry, dict) and [entry.get("size"), entry.get("mtime_ns"), entry.get("ctime_ns")] == list(key[1:]):
        digest = entry["sha256"]
    else:
        digest = sha256_of(path)
        saved[key[0]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "sha256": digest}
        try:  # a cache only: a read-only or full disk just means hashing again next time
            write_text(store, json.dumps(saved))
        except AttnEditError:
            pass
    _SHA256_CACHE[key] = digest
    return digest
