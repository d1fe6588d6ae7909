"""Atomic file and folder writes, the one place that knows how a write fails and where a command may write.

Every file attnedit writes that a later run reads (recipes, summaries, JSON results, checkpoints, the
model folder, exports, the dequantised GGUF cache) goes to a temporary name beside its destination
and is renamed into place, so a crash or a full disk never leaves a half-written file where a good
one was. A failed write removes its temporary file (and any folder it created) and raises one line
that says what went wrong and what to do: free disk space when the disk is full, choose another
place when the path cannot be written.

:func:`check_output` is what every command that writes calls on its output paths before it loads
anything: a path that cannot be written, whose folder is a file, that exists already, or that is (or
holds) one of the command's inputs is refused in one line, so no work is done that cannot be kept
and no input is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import AttnEditError


class WriteFailed(AttnEditError):
    """A write the file system refused (a full disk, a read-only place): one line naming the path, the
    cause (``reason``) and what to do. Callers that know more (a run that can be resumed) re-word it."""

    def __init__(self, path, e: BaseException, note: str = ""):
        self.path, self.reason, self.hint = Path(path), write_error_text(e), write_hint(e)
        super().__init__(f"could not write {path}: {self.reason}; {self.hint}{note}")


def write_errors() -> tuple[type[BaseException], ...]:
    """What a full disk raises while writing: OSError, or torch's/safetensors' own wrappers of it."""
    errors: tuple[type[BaseException], ...] = (OSError, RuntimeError)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:  # older safetensors
        pass
    return errors


_OS_TEXT = ("No space left on device", "Disk quota exceeded", "Permission denied", "Read-only file system", "Operation not permitted")


def write_error_text(e: BaseException) -> str:
    """One line for a failed write, whatever raised it: the system's own words when a wrapper (safetensors,
    torch) quotes them."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    if not isinstance(e, OSError):
        text = next((t for t in _OS_TEXT if t.lower() in text.lower()), text)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


# what a write failure's errno (or, for safetensors' and torch's wrappers, its text) means for the user
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_IN_THE_WAY = (errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENOTEMPTY)
_FULL_TEXT = ("no space left", "disk quota", "os error 28", "storagefull", "file too large")
_DENIED_TEXT = ("permission denied", "read-only file system", "operation not permitted", "os error 13", "os error 30")


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` (raised while writing) is the file system refusing the write, as opposed to a bug:
    any OSError, or a safetensors/torch error whose text names an I/O failure."""
    if isinstance(e, OSError):
        return True
    text = str(e).lower()
    return any(t in text for t in (*_FULL_TEXT, *_DENIED_TEXT, "ioerror", "os error", "failed writing", "unexpected pos"))


def write_hint(e: BaseException) -> str:
    """What to do about a failed write: free disk space only when the disk is full."""
    code = getattr(e, "errno", None)
    text = str(e).lower()
    if code in _FULL or any(t in text for t in _FULL_TEXT):
        return "free disk space and retry"
    if code in _DENIED or any(t in text for t in _DENIED_TEXT):
        return "choose a place you can write to"
    if code in _IN_THE_WAY:
        return "a file or folder is in the way; choose another path"
    return "check the path and retry"


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(
    path: str | os.PathLike,
    flag: str = "--out",
    folder: bool = True,
    overwrite: bool = False,
    inputs: tuple = (),
    overwrite_hint: str = "add --overwrite",
) -> Path:
    """Refuse, in one line and before anything is loaded, an output path the command could not write or
    must not replace. ``folder``: the output is a folder (else a file); ``inputs``: the paths the command
    reads (a model folder, a teacher, a recipe): the output may not be one of them, hold one, or replace a
    file inside one. An existing output is replaced only with ``overwrite`` (a folder: only when not empty).
    Nothing is created: writability is tried with a temporary folder that is removed at once."""
    out = Path(path).expanduser()
    where = Path(os.path.abspath(out))
    for item in inputs:
        if item is None or not Path(item).expanduser().exists():
            continue  # a hub id or an alias: nothing local to protect
        source = Path(os.path.abspath(Path(item).expanduser()))
        if _inside(source, where) or (_inside(where, source) and where.exists()):
            what = "is" if where == source else ("holds" if _inside(source, where) else "is a file of")
            raise AttnEditError(f"{flag} {path} {what} the input {item}; writing there would replace it: choose another {flag}")
    for parent in where.parents:
        if parent.exists() and not parent.is_dir():
            raise AttnEditError(f"{flag} {path}: {parent} is a file, not a folder; give a path whose folders are folders")
    if folder and out.exists() and not out.is_dir():
        raise AttnEditError(f"{flag} {path} is a file; give a folder")
    if not folder and out.is_dir():
        raise AttnEditError(f"{flag} {path} is a folder; give a file name")
    if out.exists() and not overwrite and (not folder or any(out.iterdir())):
        raise AttnEditError(f"{flag} {path} already exists{' and is not empty' if folder else ''}; choose another {flag} or {overwrite_hint}")
    base = _nearest_existing(where)
    try:
        os.rmdir(tempfile.mkdtemp(dir=base if base.is_dir() else base.parent, prefix=".attnedit-probe-"))
        if out.exists() and not os.access(out if out.is_dir() else out.parent, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
    except OSError as e:
        raise AttnEditError(f"{flag} {path} cannot be written ({write_error_text(e)} in {base}); {write_hint(e)}") from None
    return out


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
    made = _missing_parents(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        _remove_empty(made)
        raise WriteFailed(path, e) from None
    return path


def _missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, deepest first (what a failed write must remove)."""
    out, p = [], path.parent
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _remove_empty(folders: list[Path]) -> None:
    for f in folders:
        with contextlib.suppress(OSError):
            f.rmdir()


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
    same content-keyed cache) is kept and the temporary one dropped. A failed write inside the block (an
    ``OSError``, or safetensors'/torch's error for one, e.g. a full disk) becomes one line saying what to
    do and that nothing was replaced; neither the temporary folder nor a folder created for ``out`` survives.
    """
    out = Path(out)
    made = _missing_parents(out)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        yield tmp
        if not (keep_existing and out.exists()):
            replace_dir(tmp, out)
    except write_errors() as e:
        if not is_write_failure(e):
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise WriteFailed(out, e, " (nothing was written there)") from None
    finally:
        if tmp is not None and tmp.exists():
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
