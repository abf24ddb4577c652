"""Atomic file writes, strict JSON, and one-line errors for storage that refuses a write.

Every result file goes through `atomic_write`: write to a temporary file in the same directory,
fsync, rename. A reader (or a process killed mid-write) never sees a partial file: either the old
content or the new one exists under the final name.

Every JSON file the harness writes goes through `strict_dumps` (`atomic_write_json` uses it): NaN
and infinities become `null`, so any strict parser (JavaScript, `jq`, `json.loads` with
`parse_constant` raising) reads it; the encoder itself runs with `allow_nan=False`, so a
non-finite number that slipped past the conversion is a bug that fails loudly, never a file that
says `NaN`.

Storage that refuses a write (full disk, read-only file system, no permission, a path through a
file) is not a bug of the harness: `StorageError` is a `UserError` naming the path and the fix,
and nothing is left half-written.
"""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from harness.core.errors import UserError

FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
NOT_A_DIR = {errno.ENOTDIR, errno.EEXIST}


class StorageError(UserError):
    """The file system refused a write (full, read-only, a path through a file). Exit status 2."""


def _first_file_on(path: Path) -> Path | None:
    """The first component of `path` that exists but is not a directory (the path runs through a file)."""
    for parent in [*reversed(path.parents), path]:
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def storage_error(exc: OSError, path: Path) -> StorageError | None:
    """The one-line `StorageError` for an OS refusal to write `path`, or None for other errors."""
    path = Path(path)
    code = exc.errno
    if code in FULL:
        return StorageError(f"cannot write {path}: no space left on the device ({errno.errorcode.get(code, code)}); "
                            f"free some space or set work_dir= to a disk with room, then rerun (finished batches are kept)")
    if code in READ_ONLY:
        why = "the file system is read-only" if code == errno.EROFS else "permission denied"
        return StorageError(f"cannot write {path}: {why}; set work_dir= to a writable directory")
    if code == errno.EISDIR:
        return StorageError(f"cannot write {path}: it is a directory; give a file path")
    if code in NOT_A_DIR:
        blocker = _first_file_on(path.parent) or _first_file_on(path)
        if blocker is not None:
            return StorageError(f"cannot write {path}: {blocker} is a file, not a directory; "
                                f"set work_dir= to a directory (or move that file away)")
    return None


FULL_BELOW = 1 << 20  # bytes: a write that fails with less free space than this failed for want of it


def _full_disk(exc: Exception, path: Path) -> StorageError | None:
    """A writer that reports a full disk in its own words (torch.save's "unexpected pos", Arrow's
    I/O errors, an OSError without errno) still fails on a full disk: ask the file system."""
    try:
        st = os.statvfs(path.parent)
    except (OSError, AttributeError):
        return None
    if st.f_bavail * st.f_frsize >= FULL_BELOW:
        return None
    return storage_error(OSError(errno.ENOSPC, str(exc)), path)


def ensure_dir(path: Path, for_file: Path | None = None) -> Path:
    """`mkdir -p` with a `StorageError` (naming `for_file`, the file to be written there, if given)
    instead of a traceback when the file system refuses."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err = storage_error(exc, Path(for_file) if for_file is not None else path / "x")
        if err is None:
            raise
        raise err from None
    return path


def check_writable_dir(path: Path, key: str = "work_dir", value: Path | None = None) -> None:
    """Fail before any work when directory `path` cannot hold results: under a file, read-only,
    no permission. Messages name `key`=`value` (default: the directory itself), e.g. work_dir=...

    Nothing is created: the check walks up to the first existing ancestor. (A full disk is only
    seen when a write fails; `atomic_write` reports it the same way.)
    """
    path = Path(path).expanduser().absolute()
    shown = f"{key}={str(value if value is not None else path)!r}"
    blocker = _first_file_on(path)
    if blocker is not None:
        raise StorageError(f"{shown} is under {str(blocker)!r}, which is a file, not a directory; "
                           f"set {key}= to a path in a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    read_only = False
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): rely on os.access
        pass
    if read_only:
        raise StorageError(f"{shown} is on a read-only file system ({existing}); set {key}= to a writable directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"{shown} is not writable ({existing}: permission denied); set {key}= to a writable directory")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, then atomically move the result to `path`."""
    path = Path(path)
    tmp_path: Path | None = None
    refused: StorageError | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp_path, path)
    except Exception as exc:
        refused = storage_error(exc, path) if isinstance(exc, OSError) else None
        if refused is None:
            refused = _full_disk(exc, path)
        if refused is None:
            raise
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()
    if refused is not None:
        # raised outside the handler: the writer's failure (and the file objects its frames still
        # hold, e.g. torch.save's) is released now, so a full disk gets its space back at once
        raise refused


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def to_strict(obj: Any) -> Any:
    """A copy of `obj` that strict JSON can hold: non-finite floats -> None, numpy/torch scalars ->
    Python numbers, tuples and sets -> lists, paths and other objects -> str."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_strict(v) for v in sorted(obj, key=str)]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays, torch tensors
        return to_strict(obj.tolist())
    return str(obj)


def strict_dumps(obj: Any, indent: int | None = 2, sort_keys: bool = True) -> str:
    """Strict JSON text of `obj` (null for NaN/inf; see `to_strict`), keys sorted unless asked not to."""
    return json.dumps(to_strict(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, strict_dumps(obj) + "\n")
