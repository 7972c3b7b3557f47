"""The per-worker training loop that Ray Train runs on every worker: load the model, resume
from the latest checkpoint, step through global batches, report, checkpoint, export."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import ray.train
import torch
import transformers

from raytune_llama.config import config_from_dict
from raytune_llama.engine.checkpoint import (
    CheckpointError,
    checkpoint_format,
    load_sharded_training_state,
    load_training_state,
    newest_valid_checkpoint,
    save_sharded_training_state,
    save_training_state,
)
from raytune_llama.engine.device_info import mfu, peak_flops, peak_memory_bytes
from raytune_llama.engine.lr_schedule import lr_at
from raytune_llama.engine.model_io import build_engine, export_model, hf_model_with
from raytune_llama.engine.training_state import gather_full_state
from raytune_llama.engine.tokenizer_build import load_tokenizer
from raytune_llama.planner.plan import ParallelPlan
from raytune_llama.trainer.metrics_export import TrainingMetrics
from raytune_llama.trainer.planning import at_world_size, make_run_plan
from raytune_llama.trainer.batches import iter_global_batches, rank_slice, ray_epoch_batches


log = logging.getLogger(__name__)


def _mixed_precision(mode: str, device: torch.device):
    """bf16 on accelerators ("auto"), fp32 on CPU, or as configured."""
    if mode == "bf16" or (mode == "auto" and device.type != "cpu"):
        return "bf16"
    return None


def _restore(engine) -> dict:
    """Load the newest valid checkpoint into the engine, whatever layout saved it; returns
    its meta (or a fresh one). A corrupt or half-written checkpoint is skipped with a warning."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"step": 0, "cursor": 0, "tokens_seen": 0}
    with checkpoint.as_directory() as directory:
        latest = Path(directory)
        older = sorted((p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p.name < latest.name),
                       reverse=True)
        chosen, refused = newest_valid_checkpoint([latest, *older])
        for reason in refused:
            log.warning("skipping checkpoint: %s", reason)
        if chosen is None:
            raise CheckpointError(f"no valid checkpoint among {[str(p) for p in (latest, *older)]}: {refused}")
        if checkpoint_format(chosen) == "sharded":
            if engine.plan.backend == "deepspeed":
                raise ValueError(f"{chosen} is a sharded (checkpoint.format=sharded) checkpoint; backend "
                                 "'deepspeed' cannot load it: resume with backend=torch")
            model_state, optim_state = engine.get_state(full=False)  # this rank's shards, new layout
            state = load_sharded_training_state(chosen, model=model_state, optimizer=optim_state)
            engine.set_state(state["model"], state["optimizer"], full=False)
            return _note_world_size(state["meta"], engine)
        state = load_training_state(chosen)
    if state["optimizer"] is None and engine.plan.backend == "deepspeed":
        log.warning("DeepSpeed: optimizer moments restart from zero (only weights are in the checkpoint)")
    engine.set_state(state["model"], state["optimizer"], full=True)
    return _note_world_size(state["meta"], engine)


def _note_world_size(meta: dict, engine) -> dict:
    if meta.get("world_size") not in (None, ctx_world_size()):
        log.warning("resuming a checkpoint saved at world size %s on %s workers (layout %s)",
                    meta.get("world_size"), ctx_world_size(), engine.plan.describe())
    return meta


def ctx_world_size() -> int:
    """World size of this worker group."""
    return ray.train.get_context().get_world_size()


def _report(metrics: dict, rank: int, with_checkpoint: bool, engine, meta: dict, fmt: str = "full") -> None:
    """ray.train.report on every rank. format full: rank 0 attaches the gathered checkpoint;
    format sharded: every rank attaches its own DCP shards + rank manifest (Ray Train copies
    each rank's directory into the same checkpoint_* folder, named by rank 0)."""
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    if fmt == "sharded":
        tmp = tempfile.mkdtemp(prefix=f"raytune_llama_ckpt_r{rank}_")
        try:
            model_state, optim_state = engine.get_state(full=False)  # this rank's shards only
            save_sharded_training_state(tmp, model=model_state, optimizer=optim_state,
                                        meta={**meta, "format": "sharded", "plan": engine.plan.to_dict()},
                                        rank=rank, world_size=ctx_world_size())
            del model_state, optim_state
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp = None
    try:
        checkpoint = None
        model_state, optim_state = gather_full_state(engine)  # collective: every rank joins
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix="raytune_llama_ckpt_")
            save_training_state(tmp, model=model_state, optimizer=optim_state, meta=meta)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _quiet_worker_logs() -> None:
    """Drop per-report INFO lines (Ray logs each report under a file-path logger name) and
    progress bars; the driver prints one progress line per step instead."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point (one call per worker)."""
    _quiet_worker_logs()
    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)

    plan = ParallelPlan.from_dict(loop_config["plan"])
    if plan.world_size != world:
        # Elastic resize: this worker group is another size than the driver planned for.
        # Re-plan here (same planner, same inputs); the global batch stays the same.
        new = make_run_plan(at_world_size(cfg, world), loop_config["model_path"]).plan
        log.warning("re-planned for %d workers: %s -> %s", world, plan.describe(), new.describe())
        plan = new
    if cfg.checkpoint.format == "sharded" and plan.backend == "deepspeed":
        raise ValueError(f"checkpoint.format='sharded' needs backend=torch (the layout is {plan.describe()}); "
                         "DeepSpeed keeps its own checkpoint format: use checkpoint.format=full")
    t = cfg.train
    engine = build_engine(
        loop_config["model_path"], plan, device_type=device.type, lr=t.lr, weight_decay=t.weight_decay,
        betas=t.betas, max_grad_norm=t.max_grad_norm,
        mixed_precision=_mixed_precision(cfg.parallel.mixed_precision, device),
    )
    meta = _restore(engine)
    step, cursor, tokens_seen = meta["step"], meta["cursor"], meta["tokens_seen"]
    ck = cfg.checkpoint
    stop_at = min(t.max_steps, step + t.stop_after_steps) if t.stop_after_steps else t.max_steps
    board = loop_config.get("progress_board")
    perf = loop_config.get("performance", {})
    flops_per_token, peak = perf.get("model_flops_per_token"), peak_flops(device)
    exporter = TrainingMetrics(cfg.run.name, perf.get("layout", f"ddp dp={world}")) if rank == 0 else None
    if rank == 0 and board is not None:
        board.push.remote({"event": "start", "step": step, "world_size": world, "layout": plan.describe(),
                           "time": time.time()})
    batches = iter_global_batches(
        ray_epoch_batches(ray.train.get_dataset_shard("train")), num_samples=loop_config["num_samples"],
        global_batch=t.global_batch_size, cursor=cursor,
    )
    while step < stop_at:
        batch = next(batches)
        lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        engine.set_lr(lr)
        mine = rank_slice(batch, engine.dp_rank, engine.dp_size)
        start = time.perf_counter()
        out = engine.train_step({k: torch.from_numpy(mine[k]).long() for k in ("input_ids", "labels")})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_time = time.perf_counter() - start
        step, cursor = step + 1, cursor + t.global_batch_size
        batch_tokens = int(batch["num_tokens"].sum())  # non-padding tokens of the global batch
        tokens_seen += batch_tokens
        metrics = {
            "step": step, "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
            "step_time_s": step_time, "tokens_per_s": batch_tokens / step_time,
            "tokens_seen": tokens_seen, "samples_seen": cursor, "world_size": world,
            "max_steps": t.max_steps,
            "mfu": mfu(batch_tokens / step_time, flops_per_token, peak, world),
            "predicted_step_time_s": perf.get("predicted_step_time_s"),
            "predicted_memory_bytes": perf.get("predicted_memory_bytes"),
            "peak_memory_bytes": peak_memory_bytes(device),
        }
        metrics = {k: v for k, v in metrics.items() if v is not None}  # Ray metrics need values
        due = step == stop_at or bool(ck.every_steps and step % ck.every_steps == 0)
        if rank == 0:
            exporter.record(metrics)
            if board is not None:
                board.push.remote({**metrics, "checkpoint": due})
        if due or step % t.log_every == 0:
            meta = {"step": step, "cursor": cursor, "tokens_seen": tokens_seen, "world_size": world}
            _report(metrics, rank, bool(due), engine, meta, ck.format)
    if step >= t.max_steps:
        # The export gathers the whole model (a full copy per rank, also with
        # checkpoint.format=sharded): fine for small models, a limit for 70B.
        model_state, _ = gather_full_state(engine)  # collective: every rank joins
        if rank == 0:
            export_model(hf_model_with(loop_config["model_path"], model_state),
                         load_tokenizer(loop_config["tokenizer_path"]), loop_config["export_path"])
    engine.close()
