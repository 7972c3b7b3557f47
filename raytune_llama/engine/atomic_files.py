"""Atomic writes, the one implementation every writer in the package uses: a reader sees the
old file (or folder) or the whole new one, never a part, and nothing already saved is deleted
before its replacement is in place.

Files (write_atomic and its bytes/JSON forms; checkpoints pass their hashing stream): the bytes
go to a temporary file in the same folder, are flushed and fsynced, then renamed over the
target (rename is atomic within one filesystem, local or shared POSIX), and the folder is
fsynced so that the rename itself survives a crash.
Folders (an export, a created model: write_dir_atomic, replace_dir): written complete under a
temporary name, then the old folder is renamed aside, the new one renamed into place, and only
then the old one removed."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Any], Any], *,
                 open_tmp: Callable[[Path], Any] | None = None,
                 renamed: Callable[[Path, Path], Any] | None = None) -> Path:
    """Call write(stream) on a temporary file next to `path`, fsync it, rename it over `path`
    and fsync the folder. open_tmp opens the temporary file (default: open(tmp, "wb"); a
    checkpoint passes its hashing stream); renamed(tmp, path) is told of the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with (open_tmp or (lambda p: open(p, "wb")))(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if renamed is not None:
        renamed(tmp, path)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); a filesystem that cannot open folders skips it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write data to path atomically; returns the path."""
    return write_atomic(path, lambda f: f.write(data))


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 1) -> Path:
    """JSON (indented, keys in the given order; other objects as str) written atomically."""
    return write_bytes_atomic(path, (json.dumps(data, indent=indent, default=str) + "\n").encode())


def write_dir_atomic(final: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call write(tmp_dir) on a new temporary folder next to `final`, then swap it into place
    (replace_dir); a failed write leaves `final` as it was and removes the temporary folder."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the complete folder `tmp` to `final` (same filesystem). An existing `final` is
    renamed aside first and deleted only once the new folder is in place; if the move fails,
    the old folder is put back."""
    tmp, final = Path(tmp), Path(final)
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if aside is not None:
            os.rename(aside, final)
        raise
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final
