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
from raytune_llama.engine.checkpoint import load_training_state, save_training_state
from raytune_llama.engine.ddp_engine import DDPEngine
from raytune_llama.engine.device_info import mfu, peak_flops, peak_memory_bytes
from raytune_llama.engine.lr_schedule import lr_at
from raytune_llama.engine.model_io import export_model, load_model
from raytune_llama.engine.tokenizer_build import load_tokenizer
from raytune_llama.trainer.metrics_export import TrainingMetrics
from raytune_llama.trainer.batches import iter_global_batches, rank_slice, ray_epoch_batches


def _autocast_dtype(mode: str, device: torch.device):
    if mode == "bf16" or (mode == "auto" and device.type != "cpu"):
        return torch.bfloat16
    return None


def _restore(engine) -> dict:
    """Load the latest Ray Train checkpoint into the engine; returns its meta (or a fresh one)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"step": 0, "cursor": 0, "tokens_seen": 0}
    with checkpoint.as_directory() as directory:
        state = load_training_state(directory)
    engine.load_state(state["model"], state["optimizer"])
    return state["meta"]


def _report(metrics: dict, rank: int, with_checkpoint: bool, engine, meta: dict) -> None:
    """ray.train.report on every rank; rank 0 attaches the checkpoint when one is due."""
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    tmp = None
    try:
        checkpoint = None
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix="raytune_llama_ckpt_")
            save_training_state(tmp, model=engine.model_state_dict(), optimizer=engine.optimizer_state_dict(), meta=meta)
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

    model = load_model(loop_config["model_path"])
    engine = DDPEngine(
        model, device=device, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
        betas=cfg.train.betas, max_grad_norm=cfg.train.max_grad_norm,
        micro_batch_size=cfg.train.micro_batch_size,
        autocast_dtype=_autocast_dtype(cfg.parallel.mixed_precision, device),
    )
    meta = _restore(engine)
    step, cursor, tokens_seen = meta["step"], meta["cursor"], meta["tokens_seen"]
    t, ck = cfg.train, cfg.checkpoint
    stop_at = min(t.max_steps, step + t.stop_after_steps) if t.stop_after_steps else t.max_steps
    board = loop_config.get("progress_board")
    perf = loop_config.get("performance", {})
    flops_per_token, peak = perf.get("model_flops_per_token"), peak_flops(device)
    exporter = TrainingMetrics(cfg.run.name, perf.get("layout", f"ddp dp={world}")) if rank == 0 else None
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
        if rank == 0:
            exporter.record(metrics)
            if board is not None:
                board.push.remote(metrics)
        due = step == stop_at or (ck.every_steps and step % ck.every_steps == 0)
        if due or step % t.log_every == 0:
            meta = {"step": step, "cursor": cursor, "tokens_seen": tokens_seen, "world_size": world}
            _report(metrics, rank, bool(due), engine, meta)
    if step >= t.max_steps and rank == 0:
        export_model(engine.module, load_tokenizer(loop_config["tokenizer_path"]), loop_config["export_path"])
