"""Checkpoints written straight to a filesystem run.storage_path (trainer/checkpoint_report.py,
called by worker_loop: `_report`, and `begin_async` / `finish_async` directly): every file
lands in the final checkpoint_* folder, nothing is staged in the temp directory, Ray Train is
told not to copy (NO_UPLOAD), and `restore_latest` resumes from it; a URI storage path still stages
and uploads; an interrupted in-place write is never resumed from and is cleaned up."""
import contextlib
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
import ray.train
import torch

from raytune_llama.engine.checkpoint import MANIFEST, verify_checkpoint
from raytune_llama.engine.checkpoint_io import WRITING, choose_checkpoint
from raytune_llama.trainer import checkpoint_report, worker_loop


class FakeEngine:
    """The engine surface checkpoints use: get_state / set_state and the plan."""

    def __init__(self, value: float):
        self.model = {"w": torch.full((4, 3), value)}
        self.optim = {"state": {"w": {"step": torch.tensor(1.0), "exp_avg": torch.full((4, 3), -value)}},
                      "param_groups": [{"lr": 0.1, "params": ["w"]}]}
        self.plan = SimpleNamespace(pp=1, to_dict=lambda: {"layout": "single"})

    def get_state(self, full: bool):
        return self.model, self.optim

    def set_state(self, model, optim, full: bool):
        self.model, self.optim = model, optim

    def using_optimizer(self, optimizer=None):
        return contextlib.nullcontext()


@pytest.fixture
def ray_run(tmp_path, monkeypatch):
    """A fake Ray Train worker context whose run directory is tmp/runs/r (a filesystem path),
    a report() that records its calls, and a temp directory that must stay empty."""
    run_dir, staging = tmp_path / "runs" / "r", tmp_path / "tmp"
    run_dir.mkdir(parents=True)
    staging.mkdir()
    storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), experiment_fs_path=str(run_dir))
    context = SimpleNamespace(get_storage=lambda: storage, get_world_size=lambda: 1)
    reports = []

    def report(metrics, checkpoint=None, **kwargs):
        seen = None if checkpoint is None else sorted(p.name for p in Path(checkpoint.path).iterdir())
        reports.append(SimpleNamespace(metrics=metrics, checkpoint=checkpoint, files=seen, **kwargs))

    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_checkpoint",
                        lambda: next((r.checkpoint for r in reversed(reports) if r.checkpoint), None))
    monkeypatch.setattr("tempfile.tempdir", str(staging))
    return SimpleNamespace(run_dir=run_dir, staging=staging, storage=storage, reports=reports)


def _assert_reported_in_place(run, step: int) -> Path:
    last = run.reports[-1]
    folder = Path(last.checkpoint.path)
    assert last.checkpoint_upload_mode == ray.train.CheckpointUploadMode.NO_UPLOAD
    assert folder.parent == run.run_dir and folder.name.startswith("checkpoint_") and last.checkpoint_dir_name == folder.name
    assert MANIFEST in last.files and WRITING not in last.files  # complete when reported
    assert verify_checkpoint(folder) and last.metrics["step"] == step
    assert list(run.staging.iterdir()) == []  # nothing staged in /tmp
    return folder


@pytest.mark.parametrize("fmt", ["sharded", "full"])
def test_sync_save_writes_into_the_final_folder_and_resumes(ray_run, fmt):
    worker_loop._report({"step": 2}, True, FakeEngine(2.0), {"step": 2, "cursor": 16, "tokens_seen": 99}, fmt)
    first = _assert_reported_in_place(ray_run, 2)
    worker_loop._report({"step": 4}, True, FakeEngine(4.0), {"step": 4, "cursor": 32, "tokens_seen": 198}, fmt)
    second = _assert_reported_in_place(ray_run, 4)
    assert second.name > first.name  # sortable by time, newest last, as restore_latest expects
    resumed = FakeEngine(0.0)
    meta = checkpoint_report.restore_latest(resumed, ray_run.run_dir)
    assert (meta["step"], meta["cursor"], meta["tokens_seen"]) == (4, 32, 198)
    assert torch.equal(resumed.model["w"], torch.full((4, 3), 4.0))
    assert torch.equal(resumed.optim["state"]["w"]["exp_avg"], torch.full((4, 3), -4.0))


def test_async_save_writes_into_the_final_folder_in_the_background(ray_run):
    engine = FakeEngine(6.0)
    in_flight = checkpoint_report.begin_async(engine, {"step": 6, "cursor": 48, "tokens_seen": 7}, {"step": 6})
    engine.model["w"].add_(100.0)  # training goes on: the checkpoint keeps the step-6 state
    assert ray_run.reports == [] and list(ray_run.staging.iterdir()) == []
    checkpoint_report.finish_async(*in_flight)
    folder = _assert_reported_in_place(ray_run, 6)
    resumed = FakeEngine(0.0)
    assert checkpoint_report.restore_latest(resumed, ray_run.run_dir)["step"] == 6 and folder.is_dir()
    assert torch.equal(resumed.model["w"], torch.full((4, 3), 6.0))


def test_a_uri_storage_path_is_still_staged_and_uploaded(ray_run):
    ray_run.storage.storage_filesystem = object()  # e.g. S3: not a path every process can write
    worker_loop._report({"step": 2}, True, FakeEngine(2.0), {"step": 2, "cursor": 16, "tokens_seen": 9}, "sharded")
    last = ray_run.reports[-1]
    assert Path(last.checkpoint.path).parent == ray_run.staging and MANIFEST in last.files
    assert not hasattr(last, "checkpoint_upload_mode")  # the default: Ray Train uploads it
    assert list(ray_run.staging.iterdir()) == [] and list(ray_run.run_dir.iterdir()) == []  # removed after


def test_an_interrupted_in_place_write_is_skipped_then_removed(ray_run, caplog):
    broken = ray_run.run_dir / "checkpoint_2099-01-01_00-00-00.000000"  # newest by name
    broken.mkdir()
    (broken / WRITING).touch()
    (broken / "__0_0.distcp").write_bytes(b"half")
    assert choose_checkpoint([broken]) == (None, [])  # not a checkpoint at all: nothing refused
    assert checkpoint_report.restore_latest(FakeEngine(0.0), ray_run.run_dir)["step"] == 0  # fresh, no error
    worker_loop._report({"step": 2}, True, FakeEngine(2.0), {"step": 2, "cursor": 16, "tokens_seen": 9}, "sharded")
    assert not broken.exists() and "interrupted before its manifest" in caplog.text
    _assert_reported_in_place(ray_run, 2)
