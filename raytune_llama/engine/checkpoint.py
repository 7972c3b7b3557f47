"""Training-state checkpoints on local disk: files first, then a MANIFEST.json (sizes and
SHA-256 of every file) written by temp file + fsync + rename. A directory without a valid
manifest is never loaded, and a file that does not match its manifest entry is named in
the error."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
import logging

import torch

MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _torch_save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_training_state(directory: str | os.PathLike, *, model: dict, optimizer: dict, meta: dict) -> Path:
    """Write model/optimizer state, RNG state and meta (step, cursor, ...) then the manifest."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _torch_save_atomic(model, d / "model.pt")
    _torch_save_atomic(optimizer, d / "optimizer.pt")
    _torch_save_atomic({"torch": torch.get_rng_state()}, d / "rng.pt")
    _write_json_atomic(d / "meta.json", meta)
    files = {
        name: {"bytes": (d / name).stat().st_size, "sha256": _sha256(d / name)}
        for name in ("model.pt", "optimizer.pt", "rng.pt", "meta.json")
    }
    _write_json_atomic(d / MANIFEST, {"format_version": FORMAT_VERSION, "files": files})
    return d


def verify_checkpoint(directory: str | os.PathLike) -> dict:
    """Check every file against the manifest; return the manifest or raise CheckpointError."""
    d = Path(directory)
    manifest_path = d / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: no manifest; the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    for name, entry in manifest["files"].items():
        path = d / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 does not match the manifest (corrupted)")
    return manifest


def newest_valid_checkpoint(candidates: list[Path]) -> tuple[Path | None, list[str]]:
    """The first candidate (newest first) that verifies, and why each one before it was
    refused: a corrupt or half-written checkpoint is skipped, never loaded."""
    refused = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
            return candidate, refused
        except CheckpointError as exc:
            refused.append(str(exc))
    return None, refused


def load_training_state(directory: str | os.PathLike) -> dict:
    """Verify, then load {'model', 'optimizer', 'meta'} and restore the torch RNG."""
    d = Path(directory)
    verify_checkpoint(d)
    state = {
        "model": torch.load(d / "model.pt", map_location="cpu", weights_only=True),
        "optimizer": torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True),
        "meta": json.loads((d / "meta.json").read_text()),
    }
    rng = torch.load(d / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    return state
