"""The per-worker training loop that Ray Train runs on every worker: load the model, resume
from the latest checkpoint, step through global batches, report, checkpoint, export."""
from __future__ import annotations

import logging
import time

import ray.train
import torch
import transformers

from raytune_llama import console
from raytune_llama.config import config_from_dict
from raytune_llama.engine.checkpoint_io import resolve_format
from raytune_llama.engine.device_info import mfu, peak_flops, peak_memory_bytes
from raytune_llama.engine.lr_schedule import lr_at
from raytune_llama.engine.export import export_model_streaming
from raytune_llama.engine.model_io import build_engine
from raytune_llama.engine.ranks import broadcast_from_rank0
from raytune_llama.engine.tokenizer_build import load_tokenizer
from raytune_llama.testing.fault_injection import stall_hook
from raytune_llama.trainer.metrics_export import TrainingMetrics
from raytune_llama.engine.data.order import SampleOrder
from raytune_llama.engine.data.store import TokenStore
from raytune_llama.trainer import checkpoint_report
from raytune_llama.trainer.batches import iter_rank_batches, model_inputs
from raytune_llama.trainer.checkpoint_retention import newest_checkpoint, record_and_prune
from raytune_llama.trainer.evaluation import eval_due, evaluate, open_eval_store
from raytune_llama.trainer.planning import compute_dtype, plan_on_workers, record_placement
from raytune_llama.trainer.data_audit import data_record
from raytune_llama.trainer.run_events import CheckpointEvent, StartEvent, to_record
from raytune_llama.trainer.step_guard import follows_checkpoint, make_step_watchdog


log = logging.getLogger(__name__)


def _mixed_precision(mode: str, device: torch.device):
    """bf16 on accelerators ("auto"), fp32 on CPU, or as configured (planning.compute_dtype)."""
    return "bf16" if compute_dtype(mode, device.type != "cpu") == "bf16" else None


def _report(metrics: dict, with_checkpoint: bool, engine, meta: dict, fmt: str) -> None:
    """ray.train.report on every rank, with the checkpoint when one is due: written straight
    into its checkpoint_* folder on a filesystem run.storage_path and registered there without
    a copy, or staged locally and uploaded for a URI (trainer/checkpoint_report.py)."""
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    checkpoint_report.save_and_report(metrics, engine, meta, fmt)  # collective: every rank joins


def _after_checkpoint(cfg, board, metrics: dict) -> None:
    """Rank 0, once a checkpoint is registered: checkpoint.keep_best's pruning
    (trainer/checkpoint_retention.py) and a checkpoint record for the driver's trackers."""
    run_dir = checkpoint_report.run_dir_on_filesystem()
    folder = newest_checkpoint(run_dir) if run_dir is not None else None
    best = None
    if cfg.checkpoint.keep_best == "eval_loss" and folder is not None:
        best = record_and_prune(run_dir, folder, metrics["step"], metrics.get("eval_loss"), cfg.checkpoint.keep_last)
    if board is not None:
        board.push.remote(to_record(CheckpointEvent(metrics["step"], str(folder) if folder else None,
                                                    metrics.get("eval_loss"), best)))


def _quiet_worker_logs() -> None:
    """Drop per-report INFO lines (Ray logs each report under a file-path logger name) and
    progress bars; the driver prints one progress line per step instead."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    console.quiet_worker()  # per-rank INFO lines and library chatter: Ray Train's worker log only


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point (one call per worker)."""
    _quiet_worker_logs()
    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)

    # The driver's plan, unless this worker group is another size (elastic resize) or Ray
    # placed it on other nodes x devices than the driver planned for: then re-planned here on
    # the actual placement (same planner, same inputs on every rank; the global batch stays).
    plan, placement, replanned = plan_on_workers(cfg, loop_config, world)
    if replanned is not None:
        loop_config["performance"] = {**loop_config.get("performance", {}), **replanned.performance()}
    t = cfg.train
    engine = build_engine(
        loop_config["model_path"], plan, device_type=device.type, lr=t.lr, weight_decay=t.weight_decay,
        betas=t.betas, max_grad_norm=t.max_grad_norm,
        mixed_precision=_mixed_precision(cfg.parallel.mixed_precision, device),
        master_weights=cfg.parallel.master_weights, lora=t.lora,
    )
    record_placement(cfg.run_dir, placement, plan, engine)  # RUN_DIR/placement.json: node and tp group per rank
    meta = checkpoint_report.restore_latest(engine, cfg.run_dir)
    step, cursor, tokens_seen = meta["step"], meta["cursor"], meta["tokens_seen"]
    ck = cfg.checkpoint
    stop_at = min(t.max_steps, step + t.stop_after_steps) if t.stop_after_steps else t.max_steps
    board = loop_config.get("progress_board")
    perf = loop_config.get("performance", {})
    flops_per_token, peak = perf.get("model_flops_per_token"), peak_flops(device)
    exporter = TrainingMetrics(cfg.run.name, perf.get("layout", f"ddp dp={world}")) if rank == 0 else None
    attempt = broadcast_from_rank0(time.time())  # names this worker group in the data audit
    if rank == 0 and board is not None:
        board.push.remote(to_record(StartEvent(step, world, plan.describe(), attempt)))
    # This dp rank's rows of each global batch, read from the token store; the order is the
    # same at every world size, so a resumed or resized run continues at the exact sample.
    store = TokenStore(loop_config["token_store"])
    order = SampleOrder.for_data(store, cfg.data, t.global_batch_size)
    batches = iter_rank_batches(store, order, cursor, engine.dp_rank, engine.dp_size,
                                with_ids=cfg.data.id_column is not None)
    eval_store = open_eval_store(loop_config.get("eval_store"))
    keep_best = ck.keep_best == "eval_loss"
    in_flight = None  # (PendingSave, metrics, staged) of a checkpoint written in the background
    stall = stall_hook(rank, cfg.run_dir)
    watchdog = make_step_watchdog(cfg, rank, board)  # a stalled step ends this worker, naming rank and step
    while step < stop_at:
        batch = next(batches)
        lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        engine.set_lr(lr)
        mine = batch.rows
        start = time.perf_counter()
        with watchdog.step(step + 1, relaxed=follows_checkpoint(cfg, step)):
            if stall is not None:  # fault injection (RAYTUNE_LLAMA_STALL, testing/fault_injection.py)
                stall(step + 1)
            out = engine.train_step(model_inputs(mine))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        step_time = time.perf_counter() - start
        step, cursor = step + 1, cursor + t.global_batch_size
        batch_tokens = batch.global_tokens  # non-padding tokens of the global batch
        tokens_seen += batch_tokens
        metrics = {
            "step": step, "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
            "step_time_s": step_time, "tokens_per_s": batch_tokens / step_time,
            "tokens_seen": tokens_seen, "samples_seen": cursor, "epoch": batch.epoch, "world_size": world,
            "max_steps": t.max_steps,
            "mfu": mfu(batch_tokens / step_time, flops_per_token, peak, world),
            "predicted_step_time_s": perf.get("predicted_step_time_s"),
            "predicted_memory_bytes": perf.get("predicted_memory_bytes"),
            "peak_memory_bytes": peak_memory_bytes(device),
        }
        due = (step == stop_at and ck.save_at_end) or bool(ck.every_steps and step % ck.every_steps == 0)
        if eval_store is not None and eval_due(step, stop_at, t.max_steps, t.eval_every_steps, due, keep_best):
            # Outside the step watchdog (a whole validation set may take longer than a step's
            # bound); each collective still fails after run.collective_timeout_s.
            metrics.update(evaluate(engine, eval_store, t.global_batch_size, t.eval_max_batches,
                                    cfg.data.shuffle_seed, cfg.data.shuffle))
        metrics = {k: v for k, v in metrics.items() if v is not None}  # Ray metrics need values
        if board is not None and "doc_ids" in mine:  # data.id_column: exactly-once audit
            board.push.remote(data_record(step, attempt, rank, engine.dp_rank, mine["doc_ids"]))
        if rank == 0:
            exporter.record(metrics)
            if board is not None:
                board.push.remote({**metrics, "checkpoint": due})
        if in_flight is not None:  # the previous step's background checkpoint: finish, report
            checkpoint_report.finish_async(*in_flight)  # collective: wait, write manifests, report
            if rank == 0:
                _after_checkpoint(cfg, board, in_flight[1])
            in_flight = None
        if due or step % t.log_every == 0 or "eval_loss" in metrics:  # an evaluation always reaches Ray Train
            meta = {"step": step, "cursor": cursor, "tokens_seen": tokens_seen, "world_size": world}
            if "eval_loss" in metrics:
                meta["eval_loss"] = metrics["eval_loss"]
            fmt = resolve_format(ck.format, plan)
            if due and ck.async_save and fmt == "sharded" and step < stop_at:
                # checkpoint.async_save: shards staged in host memory, written during the next step
                in_flight = checkpoint_report.begin_async(engine, meta, metrics)
            else:
                _report(metrics, bool(due), engine, meta, fmt)
                if due and rank == 0:
                    _after_checkpoint(cfg, board, metrics)
    watchdog.close()
    if step >= t.max_steps:
        # One tensor at a time, written per pipeline stage: no rank holds the whole model.
        tokenizer = load_tokenizer(loop_config["tokenizer_path"])
        if cfg.data.chat_template:  # the exported model chats the way it was trained to
            tokenizer.chat_template = cfg.data.chat_template
        export_model_streaming(engine, loop_config["model_path"], tokenizer, loop_config["export_path"])
    engine.close()
