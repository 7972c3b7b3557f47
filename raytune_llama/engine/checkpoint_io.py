"""Checkpoint a ParallelEngine and restore it, in either format, whatever layout, world size
or backend saved it: every key is an HF parameter name, so a checkpoint written by FSDP on 2
ranks loads into TP, pipeline, DeepSpeed ZeRO-3 or a single process, and back.

Collective: every rank of the process group calls these functions in the same order.

    choose_checkpoint([newest, older, ...])   # each rank hashes 1/world of the files, all agree
    load_engine_checkpoint(engine, chosen)     # -> meta (step, cursor, tokens seen, ...)
    save_engine_checkpoint(engine, folder, meta, "sharded")
    pending = begin_async_save(engine, folder, meta)    # sharded: training goes on meanwhile
    ... train ...; finish_async_save(pending)           # then report folder

`folder` is the checkpoint's final folder on shared storage (the same on every rank) or a local
directory per rank (trainer/checkpoint_report.py decides). Every file is hashed while written
(engine/checkpoint_hashing.py).

LoRA runs (docs/lora.md): the state is the adapters and their AdamW moments only (the frozen base
is reloaded from the model files); meta.json records the run's train.lora, and a checkpoint
whose adapters are not this run's (other r / alpha / target_modules, or no LoRA) is refused by
name before anything is read into the engine.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

import torch

from raytune_llama.engine.checkpoint import (
    MANIFEST,
    checkpoint_format,
    finish_sharded_checkpoint,
    load_sharded_training_state,
    load_training_state,
    newest_valid_checkpoint,
    save_sharded_training_state,
    save_training_state,
)
from raytune_llama.engine.checkpoint_hashing import HashedFiles, HashingFileSystemWriter
from raytune_llama.engine.ranks import broadcast_from_rank0, gather_from_all_ranks, rank_and_world
from raytune_llama.engine.training_state import gather_full_state

FORMATS = ("full", "sharded")
WRITING = "WRITING"  # marker in a checkpoint folder whose ranks are still writing into it


def resolve_format(requested: str, plan) -> str:
    """checkpoint.format: 'auto' is the plan's own format (ParallelPlan.checkpoint_format)."""
    return plan.checkpoint_format if requested == "auto" else requested


def choose_checkpoint(candidates: list[Path]) -> tuple[Path | None, list[str]]:
    """The newest candidate that verifies (sizes + SHA-256 of every file, every rank's
    manifest), and why each newer one was refused. Every rank hashes its share of the files
    (about 1/world of the bytes, largest files spread first) in parallel and the verdicts are
    gathered, so verification takes total bytes / world per rank instead of rank 0 hashing a
    70B checkpoint's hundreds of GB while the others wait in a collective. Rank 0's candidate
    list is used by all. Needs the checkpoint on storage that every rank sees (shared storage).
    A folder whose write never finished (unfinished_write: a crash while the ranks wrote straight
    into it) is not a checkpoint at all and is left out, so a crash during the first checkpoint
    resumes from scratch instead of failing on a folder that was never complete."""
    rank, world = rank_and_world()
    mine = [str(p) for p in candidates if not unfinished_write(p)] if rank == 0 else []
    candidates = [Path(p) for p in broadcast_from_rank0(mine)]
    return newest_valid_checkpoint(candidates, rank, world, agree=gather_from_all_ranks)


def unfinished_write(folder: str | os.PathLike) -> bool:
    """A checkpoint folder written in place whose write did not finish: the WRITING marker rank 0
    puts there before any rank writes, and no top-level manifest (which comes last)."""
    d = Path(folder)
    return (d / WRITING).exists() and not (d / MANIFEST).exists()


def load_engine_checkpoint(engine, directory: str | os.PathLike) -> dict:
    """Load a verified checkpoint (choose_checkpoint) into the engine's current layout;
    returns its meta. Sharded: each rank reads only what its new shards need (DCP reshards).
    Full: every rank reads the whole state and keeps its part."""
    d = Path(directory)
    check_lora_matches(engine, d)
    if checkpoint_format(d) == "sharded":
        model_state, optim_state = engine.get_state(full=False)  # this rank's shards, new layout
        state = load_sharded_training_state(d, model=model_state, optimizer=optim_state, verify=False)
        engine.set_state(state["model"], state["optimizer"], full=False)
        return state["meta"]
    state = load_training_state(d, verify=False)
    engine.set_state(state["model"], state["optimizer"], full=True)
    return state["meta"]


_LORA_SHAPE_KEYS = ("r", "alpha", "target_modules")  # what the adapters' keys, shapes and meaning depend on


def lora_meta(engine) -> dict | None:
    """The engine's train.lora as recorded in a checkpoint's meta (None: full fine-tuning)."""
    lora = getattr(engine, "lora", None)
    if lora is None:
        return None
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": sorted(lora.target_modules)}


def _lora_shape(lora_meta_value: dict | None) -> dict | None:
    return None if lora_meta_value is None else {k: lora_meta_value[k] for k in _LORA_SHAPE_KEYS}


def check_lora_matches(engine, directory: Path) -> None:
    """Refuse a checkpoint whose model state is not this engine's: LoRA adapters of other
    r / alpha / target_modules, adapters for a full fine-tuning run, or the reverse."""
    meta_file = directory / "meta.json"
    if not meta_file.is_file():
        return  # verify_checkpoint reports the incomplete checkpoint
    saved, mine = json.loads(meta_file.read_text()).get("lora"), lora_meta(engine)
    if _lora_shape(saved) != _lora_shape(mine):
        raise ValueError(f"train.lora: the checkpoint {directory} was written with train.lora {saved}, this run has "
                         f"{mine}; resume with the checkpoint's train.lora settings (r, alpha, target_modules), "
                         f"or start a new run (another run.name)")


def save_engine_checkpoint(engine, directory: str | os.PathLike, meta: dict, fmt: str) -> bool:
    """Write the engine's model + optimizer state, RNG and meta into `directory` (the
    checkpoint's folder on shared storage, the same on every rank, or a local directory of this
    rank); returns whether this rank wrote anything (full: rank 0 only).
    sharded: every rank writes only its own shards and manifest, rank 0 the manifest last.
    full: the whole state is gathered to rank 0, which writes it."""
    if fmt not in FORMATS:
        raise ValueError(f"checkpoint.format: {fmt!r} is not one of {FORMATS}")
    rank, world = rank_and_world()
    meta = {**meta, "format": fmt, "plan": engine.plan.to_dict(), "lora": lora_meta(engine)}
    if fmt == "sharded":
        model_state, optim_state = engine.get_state(full=False)
        save_sharded_training_state(directory, model=model_state, optimizer=optim_state, meta=meta,
                                    rank=rank, world_size=world)
        return True
    model_state, optim_state = gather_full_state(engine)  # collective: every rank joins
    if rank == 0:
        save_training_state(directory, model=model_state, optimizer=optim_state, meta=meta)
        return True
    return False


class PendingSave:
    """A sharded checkpoint whose shards are being written in the background (`written`
    records their sizes and SHA-256 as the background writer goes)."""

    def __init__(self, future, directory: Path, meta: dict, rng_state: torch.Tensor, has_optimizer: bool,
                 written: HashedFiles):
        self.future, self.directory, self.meta = future, directory, meta
        self.rng_state, self.has_optimizer, self.written = rng_state, has_optimizer, written


_checkpoint_group = None


def _background_group():
    """A gloo group of its own for the background writer's collectives, so they never
    interleave with the training step's collectives on the default group."""
    global _checkpoint_group
    if _checkpoint_group is None and rank_and_world()[1] > 1:
        _checkpoint_group = dist.new_group(backend="gloo")  # collective: every rank, same point
    return _checkpoint_group


def begin_async_save(engine, directory: str | os.PathLike, meta: dict) -> PendingSave:
    """Start a sharded checkpoint: this rank's shards are copied (staged) to host memory now,
    at this step, and written (and hashed) by a background thread into `directory` while
    training continues; the RNG state and meta are captured now too. Nothing is a checkpoint
    until finish_async_save writes the manifests. The background write's collectives run on a
    gloo group of their own, so no training-step collective waits on its I/O."""
    import torch.distributed.checkpoint as dcp

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model_state, optim_state = engine.get_state(full=False)
    state = {"model": model_state} if optim_state is None else {"model": model_state, "optimizer": optim_state}
    writer = HashingFileSystemWriter(d)  # also the stager: a blocking copy to CPU memory
    future = dcp.async_save(state, storage_writer=writer, process_group=_background_group())
    meta = {**meta, "format": "sharded", "plan": engine.plan.to_dict(), "lora": lora_meta(engine)}
    return PendingSave(future, d, meta, torch.get_rng_state(), optim_state is not None, writer.hashed)


def finish_async_save(pending: PendingSave) -> Path:
    """Collective: wait for this rank's background write, then write the manifests (the
    top-level one last). Returns the checkpoint directory, complete."""
    pending.future.result()
    rank, world = rank_and_world()
    return finish_sharded_checkpoint(pending.directory, meta=pending.meta, rng_state=pending.rng_state,
                                     rank=rank, world_size=world, has_optimizer=pending.has_optimizer,
                                     written=pending.written)
