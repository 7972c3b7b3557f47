"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The bytes go to a temporary file in the same folder, are flushed and fsynced, then renamed
over the target (rename is atomic within one filesystem, local or shared POSIX)."""
from __future__ import annotations

import json
import os
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
