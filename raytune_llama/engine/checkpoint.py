"""Training-state checkpoints on local disk: files first, then a MANIFEST.json (sizes and
SHA-256 of every file) written by temp file + fsync + rename. A directory without a valid
manifest is never loaded, and a file that does not match its manifest entry is named in
the error.

Two formats, told apart by the top-level manifest's "format" key:
- full: rank 0 writes model.pt / optimizer.pt / rng.pt / meta.json (the gathered whole model).
- sharded: every rank writes only its own shards with torch.distributed.checkpoint (DCP) plus
  MANIFEST.rank{r}.json (sizes + SHA-256 of that rank's files); rank 0 also writes meta.json and
  rng.pt, then MANIFEST.json last, naming every expected rank manifest and its SHA-256. The
  ranks write into one shared folder (trainer/checkpoint_report.py: straight into the run's
  checkpoint_* folder on a filesystem run.storage_path) or each into a local directory that Ray
  Train merges into one checkpoint_* folder (a URI storage_path). A checkpoint missing any rank's
  manifest or any listed file, or with a file that does not match, is refused.

Every SHA-256 is computed while the file is written (engine/checkpoint_hashing.py), so a save
writes each byte once and never reads it back; verification hashes from disk, each rank its
share (share_of_files)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from raytune_llama.engine.atomic_files import write_atomic
from raytune_llama.engine.checkpoint_hashing import HashedFiles, HashingFileSystemWriter, file_sha256

MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1
SHARDED_FORMAT_VERSION = 3  # 3: optimizer state flattened per parameter


def rank_manifest_name(rank: int) -> str:
    return f"MANIFEST.rank{rank}.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _write_atomic(path: Path, write, hashed: HashedFiles | None = None) -> dict:
    """write(stream) into a temp file, fsync, rename over `path`; returns the file's {"bytes",
    "sha256"}, computed while writing (recorded in `hashed` too when given)."""
    hashed = HashedFiles() if hashed is None else hashed
    write_atomic(path, write, open_tmp=hashed.open, renamed=hashed.rename)
    return hashed.entry(path)


def _write_json_atomic(path: Path, data: Any, hashed: HashedFiles | None = None) -> dict:
    text = json.dumps(data, indent=2, sort_keys=True)  # ASCII: the bytes json.dump wrote before
    return _write_atomic(path, lambda f: f.write(text.encode()), hashed)


def _torch_save_atomic(obj: Any, path: Path, hashed: HashedFiles | None = None) -> dict:
    return _write_atomic(path, lambda f: torch.save(obj, f), hashed)


def save_training_state(directory: str | os.PathLike, *, model: dict, optimizer: dict, meta: dict) -> Path:
    """Write model/optimizer state, RNG state and meta (step, cursor, ...) then the manifest,
    whose sizes and SHA-256 were computed as the files were written."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "model.pt": _torch_save_atomic(model, d / "model.pt"),
        "optimizer.pt": _torch_save_atomic(optimizer, d / "optimizer.pt"),
        "rng.pt": _torch_save_atomic({"torch": torch.get_rng_state()}, d / "rng.pt"),
        "meta.json": _write_json_atomic(d / "meta.json", meta),
    }
    _write_json_atomic(d / MANIFEST, {"format_version": FORMAT_VERSION, "files": files})
    return d


def _check_file(path: Path, entry: dict, manifest_path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: listed in {manifest_path.name} but missing")
    if path.stat().st_size != entry["bytes"]:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, {manifest_path.name} says "
                              f"{entry['bytes']} (truncated?)")
    if file_sha256(path) != entry["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 does not match {manifest_path.name} (corrupted)")


def _read_manifest(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no {what}; the checkpoint is incomplete")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: unreadable {what} ({exc})") from exc


def checkpoint_format(directory: str | os.PathLike) -> str:
    """'full' or 'sharded', from the top-level manifest (raises CheckpointError without one)."""
    return _read_manifest(Path(directory) / MANIFEST, "manifest").get("format", "full")


def checkpoint_files(directory: str | os.PathLike) -> tuple[dict, list[tuple[Path, dict, Path]]]:
    """(top-level manifest, every data file the checkpoint's manifests list as (path, {bytes,
    sha256}, the manifest listing it)). Reads and checks the manifests only (small files): a
    missing or unreadable manifest, a sharded manifest naming the wrong number of rank manifests,
    or a rank manifest that does not match its recorded SHA-256 raises CheckpointError."""
    d = Path(directory)
    manifest_path = d / MANIFEST
    manifest = _read_manifest(manifest_path, "manifest")
    files = [(d / name, entry, manifest_path) for name, entry in manifest.get("files", {}).items()]
    if manifest.get("format", "full") == "sharded":
        ranks = manifest.get("rank_manifests")
        if not ranks or len(ranks) != manifest.get("world_size"):
            raise CheckpointError(f"{manifest_path}: sharded manifest names {len(ranks or {})} rank manifests "
                                  f"for world size {manifest.get('world_size')}")
        for name, entry in ranks.items():
            path = d / name
            if not path.is_file():
                raise CheckpointError(f"{path}: rank manifest named in {MANIFEST} is missing "
                                      "(that rank's shards were not persisted)")
            if file_sha256(path) != entry["sha256"]:
                raise CheckpointError(f"{path}: SHA-256 does not match {MANIFEST} (corrupted)")
            files += [(d / f, e, path) for f, e in _read_manifest(path, "rank manifest")["files"].items()]
    return manifest, files


def share_of_files(files: list[tuple[Path, dict, Path]], rank: int, world: int) -> list[tuple[Path, dict, Path]]:
    """The files rank `rank` of `world` verifies: largest first to the least-loaded rank, so every
    rank hashes about 1/world of the bytes (the same split on every rank)."""
    load, mine = [0] * world, []
    for item in sorted(files, key=lambda f: (-int(f[1].get("bytes", 0)), str(f[0]))):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += int(item[1].get("bytes", 0))
        if r == rank:
            mine.append(item)
    return mine


def verify_checkpoint(directory: str | os.PathLike, rank: int = 0, world: int = 1) -> dict:
    """Check the checkpoint's files against its manifest(s) and return the top-level manifest, or
    raise CheckpointError naming the file. With `world` > 1 this rank checks only its share of
    the data files (share_of_files; the manifests are checked by every rank): the ranks together
    check every file once, in parallel (checkpoint_io.choose_checkpoint)."""
    manifest, files = checkpoint_files(directory)
    for path, entry, listed_in in share_of_files(files, rank, world):
        _check_file(path, entry, listed_in)
    return manifest


def newest_valid_checkpoint(candidates: list[Path], rank: int = 0, world: int = 1,
                            agree=lambda error: [error]) -> tuple[Path | None, list[str]]:
    """The first candidate (newest first) that verifies, and why each one before it was
    refused: a corrupt or half-written checkpoint is skipped, never loaded. With `world` > 1
    each rank checks its share of the files and `agree(error or None)` returns every rank's
    verdict (a collective, e.g. all_gather_object): a candidate any rank refuses is refused by all."""
    refused = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate, rank, world)
            error = None
        except CheckpointError as exc:
            error = str(exc)
        errors = [e for e in agree(error) if e]
        if not errors:
            return candidate, refused
        refused.append(errors[0])
    return None, refused


def load_training_state(directory: str | os.PathLike, verify: bool = True) -> dict:
    """Verify (unless already verified), then load {'model', 'optimizer', 'meta'} and
    restore the torch RNG."""
    d = Path(directory)
    if verify:
        verify_checkpoint(d)
    state = {
        "model": torch.load(d / "model.pt", map_location="cpu", weights_only=True),
        "optimizer": torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True),
        "meta": json.loads((d / "meta.json").read_text()),
    }
    rng = torch.load(d / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    return state


def save_sharded_training_state(directory: str | os.PathLike, *, model: dict, optimizer: dict | None,
                                meta: dict, rank: int, world_size: int) -> Path:
    """Collective (every rank calls it with the same shared folder, or each with its own local
    one): DCP-save this rank's shards of {"model", "optimizer"} (from engine.get_state(full=False))
    through a hashing writer, then finish_sharded_checkpoint. No rank holds more than its shards."""
    import torch.distributed.checkpoint as dcp

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
    writer = HashingFileSystemWriter(d)
    dcp.save(state, storage_writer=writer)
    return finish_sharded_checkpoint(d, meta=meta, rng_state=torch.get_rng_state(), rank=rank,
                                     world_size=world_size, has_optimizer=optimizer is not None,
                                     written=writer.hashed)


def finish_sharded_checkpoint(directory: str | os.PathLike, *, meta: dict, rng_state: torch.Tensor, rank: int,
                              world_size: int, has_optimizer: bool, written: HashedFiles) -> Path:
    """Collective, after this rank's DCP files are complete (`written`: their sizes and SHA-256,
    recorded while DCP wrote them): rank 0 writes rng.pt + meta.json; every rank writes
    MANIFEST.rank{r}.json listing only the files it wrote (the folder may be shared by all
    ranks); rank 0 writes MANIFEST.json last, naming every rank manifest with its SHA-256
    (gathered from the ranks).

    The gather waits only for the other ranks' small manifest writes: their shard writes ended
    inside dcp.save (whose own final gather is the one wait on the slowest rank's shard I/O, see
    bench/checkpoint_scale.py) and nothing is read back, so it never waits on long I/O."""
    import torch.distributed as dist

    d = Path(directory)
    if rank == 0:
        _torch_save_atomic({"torch": rng_state}, d / "rng.pt", written)
        _write_json_atomic(d / "meta.json", meta, written)
    mine = rank_manifest_name(rank)
    entry = (mine, {"sha256": _write_json_atomic(d / mine, {"format_version": SHARDED_FORMAT_VERSION,
                                                            "rank": rank, "files": written.entries_in(d)})["sha256"]})
    if dist.is_initialized() and world_size > 1:
        entries = [None] * world_size if rank == 0 else None
        dist.gather_object(entry, entries, dst=0)
    else:
        entries = [entry]
    if rank == 0:
        _write_json_atomic(d / MANIFEST, {
            "format_version": SHARDED_FORMAT_VERSION, "format": "sharded", "world_size": world_size,
            "has_optimizer": has_optimizer, "files": {}, "rank_manifests": dict(entries),
        })
    return d


def load_sharded_training_state(directory: str | os.PathLike, *, model: dict, optimizer: dict | None,
                                verify: bool = True) -> dict:
    """Verify (unless already verified), then DCP-load into this rank's (new layout's) state
    dicts in place, restore the torch RNG from rng.pt; returns {'model', 'optimizer', 'meta'}.
    DCP reshards across world sizes and layouts (keys are HF FQNs)."""
    import torch.distributed.checkpoint as dcp

    d = Path(directory)
    manifest = verify_checkpoint(d) if verify else _read_manifest(d / MANIFEST, "manifest")
    if manifest.get("format") != "sharded":
        raise CheckpointError(f"{d}: not a sharded checkpoint")
    if manifest.get("format_version") != SHARDED_FORMAT_VERSION:
        raise CheckpointError(f"{d}: sharded format version {manifest.get('format_version')}, this version "
                              f"reads {SHARDED_FORMAT_VERSION}; resume it with the release that wrote it")
    state = {"model": model}
    if optimizer is not None and manifest.get("has_optimizer", True):
        state["optimizer"] = optimizer
    dcp.load(state, checkpoint_id=str(d))
    rng = torch.load(d / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    return {"model": state["model"], "optimizer": state.get("optimizer"),
            "meta": json.loads((d / "meta.json").read_text())}
