"""Writing a checkpoint and reporting it to Ray Train (trainer/worker_loop.py `_report`,
`_begin_async_report`, `_finish_async_report`), without copying it when that can be avoided.

On a filesystem `run.storage_path` (a local path or shared mount: what resume needs anyway,
README "Limits") every rank writes its files straight into the checkpoint's final folder
`{run.storage_path}/{run.name}/checkpoint_<date>` and the folder is reported with
`CheckpointUploadMode.NO_UPLOAD`: Ray Train registers it where it is (and still deletes it
past `checkpoint.keep_last`) instead of copying every rank's files from a local staging
directory, a copy the step after a checkpoint used to wait for (bench/RESULTS.md, checkpoint
cost). The folder name is Ray's own `checkpoint_YYYY-MM-DD_HH-MM-SS.ffffff` (sortable by time,
what `_restore` globs), picked by rank 0 and broadcast: Ray Train refuses a report whose ranks
name different folders.

A folder written in place is incomplete until rank 0's MANIFEST.json, written last, so it is
never loaded half-written (engine/checkpoint.py). Rank 0 also puts a WRITING marker into it
before any rank writes: a folder holding the marker and no manifest is a write that a crash
interrupted, which choose_checkpoint leaves out (a crash in the first checkpoint then resumes
from scratch rather than failing) and the next checkpoint deletes.

On a URI `run.storage_path` (s3://, gs://, ...) every rank writes into a local staging
directory that Ray Train uploads, as before."""
from __future__ import annotations

import contextlib
import datetime
import logging
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs
import ray.train

from raytune_llama.engine.checkpoint import CheckpointError
from raytune_llama.engine.checkpoint_io import (
    WRITING,
    begin_async_save,
    choose_checkpoint,
    finish_async_save,
    load_engine_checkpoint,
    save_engine_checkpoint,
    unfinished_write,
)
from raytune_llama.engine.ranks import broadcast_from_rank0, rank_and_world

log = logging.getLogger(__name__)
STAGING_PREFIX = "raytune_llama_ckpt_"


def run_dir_on_filesystem() -> Path | None:
    """`{run.storage_path}/{run.name}` as Ray Train resolved it, when it lives on a filesystem
    that every process addresses by path; None for a URI (or if this Ray version's storage
    context cannot be read: then checkpoints are staged and uploaded, slower but correct)."""
    try:
        storage = ray.train.get_context().get_storage()
        fs, path = storage.storage_filesystem, storage.experiment_fs_path
    except (AttributeError, NotImplementedError) as exc:
        log.warning("cannot read Ray Train's storage context (%s); checkpoints are staged locally "
                    "and uploaded", exc)
        return None
    return Path(path) if isinstance(fs, pyarrow.fs.LocalFileSystem) else None


def new_checkpoint_name() -> str:
    """Ray Train's own checkpoint folder name for now (ray/train/v2 StorageContext
    .make_default_checkpoint_dir_name), so folders of both kinds sort together by time."""
    return "checkpoint_" + datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")


def remove_unfinished_writes(run_dir: Path) -> None:
    """Delete checkpoint folders whose write a crash interrupted (WRITING marker, no manifest):
    no process writes into them any more (a worker group finishes its own background save
    before it starts the next one) and they can never become complete."""
    for folder in sorted(run_dir.glob("checkpoint_*")):
        if folder.is_dir() and unfinished_write(folder):
            log.warning("removing %s: a checkpoint write that was interrupted before its manifest", folder)
            shutil.rmtree(folder, ignore_errors=True)


def open_checkpoint_folder() -> Path | None:
    """Collective. The final folder of a new checkpoint on a filesystem storage path, created by
    rank 0 with the WRITING marker in it before any rank writes, the same on every rank; None
    when checkpoints must be staged and uploaded (URI storage path). If rank 0 cannot create
    it, every rank raises (rather than the others waiting for a folder that never comes)."""
    folder, error = None, None
    if rank_and_world()[0] == 0:
        try:
            folder = _create_folder()
        except OSError as exc:
            error = f"run.storage_path: cannot create a checkpoint folder ({exc}); make it writable by every worker"
    folder, error = broadcast_from_rank0((folder, error))
    if error:
        raise OSError(error)
    return None if folder is None else Path(folder)


def _create_folder() -> str | None:
    run_dir = run_dir_on_filesystem()
    if run_dir is None:
        return None
    remove_unfinished_writes(run_dir)
    folder = run_dir / new_checkpoint_name()
    folder.mkdir(parents=True)
    (folder / WRITING).touch()
    return str(folder)


def report_in_place(metrics: dict, folder: Path) -> None:
    """Every rank, once its part of `folder` is written (rank 0: after MANIFEST.json): register
    the folder with Ray Train where it is (NO_UPLOAD: nothing is copied). Every rank names the
    same folder, as Ray Train requires."""
    if rank_and_world()[0] == 0:
        (folder / WRITING).unlink(missing_ok=True)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                     checkpoint_dir_name=folder.name,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


def save_and_report(metrics: dict, engine, meta: dict, fmt: str) -> None:
    """Collective: write a checkpoint (format full or sharded) and report it with `metrics`:
    in place on a filesystem storage path, else staged in a local directory per rank that Ray
    Train uploads (full: rank 0 attaches it; sharded: every rank its own files)."""
    folder = open_checkpoint_folder()
    if folder is not None:
        save_engine_checkpoint(engine, folder, meta, fmt)  # collective: every rank joins
        report_in_place(metrics, folder)
        return
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX)
    try:
        wrote = save_engine_checkpoint(engine, staging, meta, fmt)  # collective: every rank joins
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging) if wrote else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def begin_async(engine, meta: dict, metrics: dict) -> tuple:
    """checkpoint.async_save: stage this step's shards in host memory and write them in the
    background, straight into the final folder where the storage path allows (else into a
    local staging directory). Returns what finish_async takes."""
    folder = open_checkpoint_folder()
    staged = folder is None
    directory = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX)) if staged else folder
    return begin_async_save(engine, directory, meta), metrics, staged


def finish_async(pending, metrics: dict, staged: bool) -> None:
    """Collective: wait for the background write, write the manifests, report (in place, or
    uploaded from the staging directory, which is then removed)."""
    try:
        directory = finish_async_save(pending)
        if staged:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
        else:
            report_in_place(metrics, directory)
    finally:
        if staged:
            shutil.rmtree(pending.directory, ignore_errors=True)


def restore_latest(engine, run_dir: Path | None, optimizer=None) -> dict:
    """Load the newest valid checkpoint of this run into the engine (and, for a user's loop,
    into its own `optimizer`: ParallelEngine.using_optimizer), whatever layout, world size or
    backend saved it; returns its meta (or a fresh one). Candidates, newest first: every
    checkpoint_* folder of the run, including one written after the last checkpoint Ray Train
    registered (Ray commits a reported checkpoint asynchronously: a failure in between would
    otherwise cost one more checkpoint interval). A corrupt or half-written checkpoint is
    skipped with a warning; every rank verifies its share of the files, every rank loads the
    same one."""
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as directory:
        registered = Path(directory) if directory else None
        folder = registered.parent if registered is not None else run_dir
        found = [] if folder is None else [p for p in Path(folder).glob("checkpoint_*") if p.is_dir()]
        candidates = sorted(found, key=lambda p: p.name, reverse=True)
        if registered is not None and registered not in candidates:
            candidates.insert(0, registered)
        chosen, refused = choose_checkpoint(candidates)
        for reason in refused:
            log.warning("skipping checkpoint: %s", reason)
        if chosen is None and refused:
            raise CheckpointError(f"no valid checkpoint among {[str(p) for p in candidates]}: {refused}")
        if chosen is None:
            return {"step": 0, "cursor": 0, "tokens_seen": 0}
        if registered is None or chosen.name > registered.name:
            log.warning("resuming from %s, which Ray Train had not registered yet (last registered: %s)",
                        chosen, registered)
        with engine.using_optimizer(optimizer):
            meta = load_engine_checkpoint(engine, chosen)
    world = ray.train.get_context().get_world_size()
    if meta.get("world_size") not in (None, world):
        log.warning("resuming a checkpoint saved at world size %s on %s workers (layout %s)",
                    meta.get("world_size"), world, engine.plan.describe())
    return meta
