"""Checkpoint hashes are computed while the files are written (engine/checkpoint_hashing.py):
the recorded SHA-256 equals the file's on disk for both formats, nothing is read back during a
save, every rank of a shared folder lists only its own files, a file written out of order is
hashed from disk instead, and verification still catches a flipped byte."""
import json
import logging
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import raytune_llama.engine.checkpoint as ckpt
import raytune_llama.engine.checkpoint_hashing as hashing
from raytune_llama.engine.checkpoint import (
    CheckpointError,
    MANIFEST,
    checkpoint_files,
    save_sharded_training_state,
    save_training_state,
    verify_checkpoint,
)
from raytune_llama.engine.checkpoint_hashing import HashedFiles, file_sha256


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_reading_back(monkeypatch_or_none=None):
    """Make any hash-from-disk during a save fail loudly."""
    def refuse(path):
        raise AssertionError(f"{path} was read back to hash it")
    if monkeypatch_or_none is not None:
        monkeypatch_or_none.setattr(hashing, "file_sha256", refuse)
        monkeypatch_or_none.setattr(ckpt, "file_sha256", refuse)
    else:
        hashing.file_sha256 = ckpt.file_sha256 = refuse


def _state(rank: int):
    key = f"layer{rank}.weight"
    return ({key: torch.randn(64, 32)},
            {"state": {key: {"step": torch.tensor(2.0), "exp_avg": torch.randn(64, 32)}},
             "param_groups": [{"lr": 0.1, "params": [key]}]})


def _shared_folder_worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _no_reading_back()
        model, optim = _state(rank)
        save_sharded_training_state(folder, model=model, optimizer=optim, meta={"step": 1}, rank=rank,
                                    world_size=world)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A sharded checkpoint written by 2 gloo ranks into one folder, as on a shared filesystem
    (trainer/checkpoint_report.py), with hashing from disk forbidden in the ranks."""
    folder = tmp_path_factory.mktemp("shared") / "checkpoint_2026-01-01_00-00-00.000000"
    for attempt in range(3):
        try:
            mp.spawn(_shared_folder_worker, args=(2, _port(), str(folder)), nprocs=2, join=True)
            return folder
        except mp.ProcessExitedException:
            if attempt == 2:  # a free port taken before gloo bound it: start over on a new one
                raise
            shutil.rmtree(folder, ignore_errors=True)


def _rank_files(folder: Path, rank: int) -> dict:
    return json.loads((folder / f"MANIFEST.rank{rank}.json").read_text())["files"]


def test_sharded_hashes_recorded_while_writing_equal_the_files_on_disk(shared):
    for rank in (0, 1):
        files = _rank_files(shared, rank)
        assert files, rank
        for name, entry in files.items():
            path = shared / name
            assert entry == {"bytes": path.stat().st_size, "sha256": file_sha256(path)}, name
    verify_checkpoint(shared)


def test_each_rank_of_a_shared_folder_lists_only_its_own_files(shared):
    rank0, rank1 = set(_rank_files(shared, 0)), set(_rank_files(shared, 1))
    assert not rank0 & rank1
    assert {n for n in rank1 if n.endswith(".distcp")} and all(n.startswith("__1_") for n in rank1)
    assert {".metadata", "rng.pt", "meta.json"} <= rank0  # the coordinator's files
    listed = {str(p) for p, _, _ in checkpoint_files(shared)[1]}
    on_disk = {str(p) for p in shared.iterdir() if not p.name.startswith("MANIFEST")}
    assert listed == on_disk  # every file once, nothing unlisted


def test_a_flipped_byte_in_a_shared_folder_is_caught(shared, tmp_path):
    copy = tmp_path / shared.name
    shutil.copytree(shared, copy)
    shard = next(copy.glob("__1_*.distcp"))
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 3] ^= 0x01
    shard.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=f"{shard.name}: SHA-256 does not match"):
        verify_checkpoint(copy)


def test_full_format_hashes_recorded_while_writing(tmp_path, monkeypatch):
    model, optim = _state(0)
    _no_reading_back(monkeypatch)
    save_training_state(tmp_path, model=model, optimizer=optim, meta={"step": 3})
    monkeypatch.undo()
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert set(files) == {"model.pt", "optimizer.pt", "rng.pt", "meta.json"}
    for name, entry in files.items():
        assert entry == {"bytes": (tmp_path / name).stat().st_size, "sha256": file_sha256(tmp_path / name)}
    verify_checkpoint(tmp_path)
    blob = bytearray((tmp_path / "optimizer.pt").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (tmp_path / "optimizer.pt").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="optimizer.pt: SHA-256"):
        verify_checkpoint(tmp_path)


def test_single_process_sharded_save_never_reads_back(tmp_path, monkeypatch):
    model, optim = _state(0)
    _no_reading_back(monkeypatch)
    save_sharded_training_state(tmp_path, model=model, optimizer=optim, meta={"step": 1}, rank=0, world_size=1)
    monkeypatch.undo()
    verify_checkpoint(tmp_path)


def test_a_file_written_out_of_order_is_hashed_from_disk(tmp_path, caplog):
    hashed, path = HashedFiles(), tmp_path / "f.bin"
    with caplog.at_level(logging.WARNING, logger=hashing.__name__):
        with hashed.open(path) as f:
            f.write(b"a" * 100)
            f.seek(10)
            f.write(b"b" * 5)
    assert "not written sequentially" in caplog.text
    assert hashed.entry(path) == {"bytes": 100, "sha256": file_sha256(path)}


def test_renames_are_followed_and_failed_writes_not_recorded(tmp_path):
    hashed = HashedFiles()
    with hashed.open(tmp_path / "x.tmp") as f:
        f.write(memoryview(torch.arange(10, dtype=torch.float32).numpy()))  # a typed buffer
    os.replace(tmp_path / "x.tmp", tmp_path / "x")
    hashed.rename(tmp_path / "x.tmp", tmp_path / "x")
    with pytest.raises(RuntimeError):
        with hashed.open(tmp_path / "y") as f:
            f.write(b"partial")
            raise RuntimeError("the writer died")
    assert hashed.entries_in(tmp_path) == {"x": {"bytes": 40, "sha256": file_sha256(tmp_path / "x")}}
