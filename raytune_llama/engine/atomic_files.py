"""Atomic writes: a reader sees the old file (or folder) or the whole new one, never a part,
and nothing already saved is deleted before its replacement is in place.

Files: the bytes go to a temporary file in the same folder, are flushed and fsynced, then
renamed over the target (rename is atomic within one filesystem, local or shared POSIX).
Folders (an export, a created model): written complete under a temporary name, then the old
folder is renamed aside, the new one renamed into place, and only then the old one removed."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write data to path atomically; returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """JSON (indented, keys in the given order) written atomically."""
    return write_bytes_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


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
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final
