"""LlamaTrainer: a validated Config → a Ray Train TorchTrainer run with a Ray Data
pipeline, live progress on the driver, and a run summary.

    from raytune_llama import LlamaTrainer, load_config
    summary = LlamaTrainer(load_config("examples/configs/tiny_cpu.yaml")).fit()
"""
from __future__ import annotations

import logging
import time

from raytune_llama.config import Config, ConfigError
from raytune_llama.trainer import chaos, cluster
from raytune_llama.trainer.data_audit import audit
from raytune_llama.trainer.run_dir import absolutize, existing_checkpoints, merge_step_history
from raytune_llama.trainer.progress import stall_events, start_events, step_records
from raytune_llama.trainer.run_report import write_run_report

log = logging.getLogger(__name__)


class LlamaTrainer:
    """Fine-tunes the configured model on the configured data with Ray Train."""

    def __init__(self, config: Config, callbacks: list | None = None):
        """callbacks: Ray Train callbacks of the run (e.g. the one that forwards its reports to
        a Ray Tune trial: trainer/tune_trials.py)."""
        self.config = absolutize(config.validate())
        self.callbacks = list(callbacks or [])

    def _check_resume_policy(self) -> None:
        cfg = self.config
        found = existing_checkpoints(cfg.run_dir)
        if cfg.checkpoint.resume == "must" and not found:
            raise ConfigError([
                f"checkpoint.resume: 'must' but {cfg.run_dir} has no checkpoint; run once with "
                f"resume: auto, or point run.name/run.storage_path at an existing run"
            ])
        if cfg.checkpoint.resume == "never" and found:
            raise ConfigError([
                f"checkpoint.resume: 'never' but {cfg.run_dir} already holds {len(found)} "
                f"checkpoint(s); choose a new run.name (nothing saved is deleted)"
            ])

    def fit(self) -> dict:
        """Run training to train.max_steps (or stop_after_steps); return the run summary."""
        from raytune_llama.trainer.worker_loop import train_loop_per_worker

        return self._run(train_loop_per_worker, user_args=None)

    def launch(self, train_fn, user_args: dict) -> dict:
        """Run the user's own per-worker loop `train_fn(args)` (a plain PyTorch loop with
        `raytune_llama.enable_advanced_parallelization()`) with this config's model, data and
        layout; args gets model_path and tokenizer_path added. Returns the run summary."""
        return self._run(train_fn, user_args=dict(user_args))

    def _run(self, train_fn, user_args: dict | None) -> dict:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from raytune_llama.engine.hf_cache import resolve_pretrained
        from raytune_llama.engine.model_io import ensure_model
        from raytune_llama.trainer.data_pipeline import (
            StoreBuilder,
            dataset_info,
            open_eval_data,
            open_token_store,
            store_root,
            wait_for_first_batch,
        )
        from raytune_llama.trainer.trackers import open_trackers
        from raytune_llama.trainer.planning import elastic_world_sizes, make_run_plan
        from raytune_llama.trainer.progress import ProgressBoard, ProgressPrinter
        from raytune_llama.trainer.user_loop import guard_user_loop, user_loop_env

        cfg = self.config
        self._check_resume_policy()
        started = time.time()
        p = cfg.parallel
        builder = eval_builder = None
        own_cluster = cluster.connect(
            cfg.run.address, cluster.local_num_cpus(p.num_workers, p.cpus_per_worker, cfg.run.local_num_cpus)
        )
        try:
            model_path = ensure_model(cfg.model.name_or_path, cfg.model.random_init, cfg.model.seed)
            # A hub id resolves to its snapshot in the HF cache, as the model does.
            tokenizer_path = str(resolve_pretrained(cfg.model.tokenizer, "model.tokenizer")) if cfg.model.tokenizer \
                else model_path
            # The layout is settled before any data is read: a bad layout fails in seconds.
            # Planned on the cluster Ray gives the run: nodes, devices per node and accelerator
            # from ray.nodes(), the workers placed as Ray Train places them (trainer/planning.py).
            ray_nodes = ray.nodes()
            run_plan = make_run_plan(cfg, model_path, ray_nodes)
            perf = run_plan.performance()
            print(f"[raytune_llama] layout ({run_plan.source}): {run_plan.plan.describe()} on "
                  f"{run_plan.cluster.describe()}", flush=True)
            workers = p.num_workers
            if p.min_workers is not None and p.min_workers < p.num_workers:
                # Every size in the range must have a layout: Ray Train may start or resize at any.
                sizes = elastic_world_sizes(cfg, model_path, ray_nodes)
                print(f"[raytune_llama] elastic: {p.min_workers}..{p.num_workers} workers; the global batch "
                      f"of {cfg.train.global_batch_size} is kept at sizes {sorted(sizes)}", flush=True)
                workers = (p.min_workers, p.num_workers)
            d = cfg.data
            try:  # the corpus's chunks and its token store (tokenized once per content + tokenizer + seq_len)
                store = open_token_store(d, tokenizer_path, store_root(d, cfg.run.storage_path))
                reserved = p.num_workers * p.cpus_per_worker  # what the training workers take at most
                builder = StoreBuilder(store, tokenizer_path, d.shuffle_seed, d.shuffle,
                                       cpus_free=ray.cluster_resources().get("CPU", 0) - reserved).start()
                wait_for_first_batch(store, d, cfg.train.global_batch_size)
                eval_store, eval_builder = open_eval_data(d, tokenizer_path, store, cfg.run.storage_path,
                                                          cpus_free=ray.cluster_resources().get("CPU", 0) - reserved)
            except ValueError as exc:  # an empty dataset, a column that is not there, an unreadable file
                raise ConfigError([str(exc)]) from exc
            info = dataset_info(store, d)
            print(f"[raytune_llama] data: {_describe_data(info, len(builder.pending))} from {d.path}"
                  + (f"; skipped {info.docs_skipped:,} rows without usable text (empty, missing or not a "
                     f"string in column {d.text_column!r})" if info.docs_skipped else ""), flush=True)
            board_name = f"raytune_llama_progress_{cfg.run.name}_{int(started * 1000)}"
            # On the driver's node (the head, for Ray client and job drivers), as Ray Train places
            # its controller: a board on a worker node would die with that node, and with it
            # every step record the run summary is built from.
            board = ProgressBoard.options(name=board_name, scheduling_strategy=NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False)).remote()
            trackers = open_trackers(cfg.run.trackers, cfg.run_dir, cfg.run.name, cfg.to_dict()) \
                if cfg.run.trackers else None
            printer = ProgressPrinter(board, on_checkpoint=lambda recs: self._report_now(
                recs, dataset_info(store, d), started, perf),
                on_record=trackers.record if trackers is not None else None).start()
            env = {} if p.use_gpu else {"DS_ACCELERATOR": "cpu"}  # CPU: DeepSpeed must not probe GPUs
            env.update(chaos.forwarded_env())  # fault injection (RAYTUNE_LLAMA_STALL) set on the driver
            if user_args is None:
                loop_config = {
                    "config": cfg.to_dict(), "model_path": model_path, "tokenizer_path": tokenizer_path,
                    "export_path": str(cfg.export_path), "token_store": info.store_path,
                    "eval_store": eval_store,
                    "progress_board": board, "performance": perf, "plan": run_plan.plan.to_dict(),
                    "cluster": run_plan.cluster.to_dict(),  # what the plan assumed; the workers check it
                }
            else:
                loop_config = {**user_args, "model_path": model_path, "tokenizer_path": tokenizer_path}
                env.update(user_loop_env(run_plan.plan, board_name, info.store_path, cfg))
            if user_args is not None:  # the user's loop runs under the run's step watchdog too
                train_fn = guard_user_loop(train_fn, cfg.to_dict())
            trainer = TorchTrainer(
                train_fn,
                train_loop_config=loop_config,
                torch_config=TorchConfig(timeout_s=cfg.run.collective_timeout_s),
                scaling_config=ScalingConfig(
                    num_workers=workers, use_gpu=p.use_gpu,
                    resources_per_worker={"CPU": p.cpus_per_worker},
                    placement_strategy="PACK",  # the placement the driver plans on (planner/cluster.py)
                    elastic_resize_monitor_interval_s=p.resize_check_s,
                ),
                run_config=RunConfig(
                    name=cfg.run.name, storage_path=cfg.run.storage_path,
                    failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                    # keep_best: the run prunes itself (trainer/checkpoint_retention.py)
                    checkpoint_config=CheckpointConfig(
                        num_to_keep=None if cfg.checkpoint.keep_best else cfg.checkpoint.keep_last),
                    logging_config=LoggingConfig(log_level="WARNING"),
                    callbacks=self.callbacks or None,
                    worker_runtime_env={"env_vars": env} if env else None,
                ),
            )
            try:
                result = trainer.fit()
            finally:
                records = printer.stop()
                ray.kill(board)
            summary = self._summary(records, result, dataset_info(store, d), time.time() - started)
            summary["layout"] = _layout_run(summary, perf)
            if trackers is not None:
                trackers.finish(summary)
        finally:
            for b in (builder, eval_builder):
                if b is not None:
                    b.stop()  # chunks not built yet are built by the next run that needs them
            if own_cluster:
                ray.shutdown()
        write_run_report(cfg.run_dir, summary, merge_step_history(cfg.run_dir, step_records(records)))
        return summary

    def _report_now(self, all_records: list[dict], info, started: float, perf: dict) -> None:
        """summary.json + loss.png as of a checkpoint (the final report overwrites them)."""
        summary = self._summary(all_records, None, info, time.time() - started)
        summary["layout"] = _layout_run(summary, perf)
        write_run_report(self.config.run_dir, summary, merge_step_history(self.config.run_dir, step_records(all_records)))

    def _summary(self, all_records: list[dict], result, info, wall_s: float) -> dict:
        cfg = self.config
        records, starts = step_records(all_records), start_events(all_records)
        last = records[-1] if records else {}
        steady = records[1:] or records  # the first step includes warm-up work
        tput = sum(r["tokens_per_s"] for r in steady) / len(steady) if steady else 0.0
        mfus = [r["mfu"] for r in steady if "mfu" in r]
        checkpoint = getattr(result, "checkpoint", None)
        return {
            "run_name": cfg.run.name,
            "steps_this_run": len(records),
            "final_step": last.get("step"),
            "max_steps": cfg.train.max_steps,
            "first_loss": records[0]["loss"] if records else None,
            "final_loss": last.get("loss"),
            "mean_tokens_per_s": tput,
            "mean_mfu": sum(mfus) / len(mfus) if mfus else None,
            "predicted_step_time_s": last.get("predicted_step_time_s"),
            "mean_step_time_s": sum(r["step_time_s"] for r in steady) / len(steady) if steady else None,
            "tokens_seen": last.get("tokens_seen"),
            "world_size": last.get("world_size"),
            "wall_time_s": wall_s,
            "dataset_sequences": info.num_samples,  # None while the store is still being built
            "docs_skipped": info.docs_skipped,
            "token_store": info.store_path,
            "data_chunks": [info.chunks_built, info.chunks],
            # data.id_column: the document ids of the committed steps, in training order
            "data_audit": audit(all_records),
            "checkpoint": checkpoint.path if checkpoint is not None else None,
            "export_path": str(cfg.export_path) if last.get("step") == cfg.train.max_steps else None,
            # worker-group restarts after a failure, and grows: Ray Train restarting the group at
            # a larger world size because capacity came back (elastic runs; not a failure)
            "restarts": max(len(starts) - 1, 0) - _grows(starts),
            "grows": _grows(starts),
            # steps computed again after a restart (work lost since the last checkpoint)
            "steps_redone": sum(1 for r in all_records if "event" not in r) - len(records),
            "world_size_history": [e["world_size"] for e in starts],
            "layout_history": [e.get("layout") for e in starts],  # re-planned at every new size
            "resumed_at_steps": [e["step"] for e in starts],
            "worker_group_start_times": [e.get("time") for e in starts],
            # ranks whose step ran past its bound (run.step_timeout_s), each ending its worker group
            "stalls": [{k: e.get(k) for k in ("rank", "step", "waited_s", "bound_s", "where", "time")}
                       for e in stall_events(all_records)],
            "losses": [r["loss"] for r in records],
            "steps": [r["step"] for r in records],
            **eval_summary(records, cfg.run_dir),
        }


def record_perplexity(record: dict) -> float:
    """The perplexity of a step record (a user's loop may log eval_loss alone)."""
    from raytune_llama.trainer.evaluation import perplexity

    return record.get("eval_perplexity") or perplexity(record["eval_loss"])


def eval_summary(records: list[dict], run_dir) -> dict:
    """The validation results of a run's step records: the last eval loss, its history, and
    the best checkpoint kept by checkpoint.keep_best."""
    from raytune_llama.trainer.checkpoint_retention import best_checkpoint

    evals = [r for r in records if "eval_loss" in r]
    if not evals:
        return {}
    return {"eval_loss": evals[-1]["eval_loss"], "eval_perplexity": record_perplexity(evals[-1]),
            "eval_losses": [r["eval_loss"] for r in evals], "eval_steps": [r["step"] for r in evals],
            "best_eval_loss": min(r["eval_loss"] for r in evals), "best_checkpoint": best_checkpoint(run_dir)}


def _describe_data(info, building: int) -> str:
    if info.num_samples is not None:
        return (f"{info.num_samples:,} packed sequences of {info.seq_len} tokens in {info.chunks} chunk(s) "
                f"(token store {info.store_path}" + (", tokenized now)" if building else ", tokenized before)"))
    return (f"token store {info.store_path}: {info.chunks_built} of {info.chunks} chunks tokenized, the rest "
            f"are tokenized in the background while training runs")


def _layout_run(summary: dict, perf: dict) -> str:
    """The layout the last worker group ran (re-planned there after a resize or on another
    placement than the driver planned for), else the driver's."""
    return next((layout for layout in reversed(summary["layout_history"]) if layout), perf["layout"])


def _grows(starts: list[dict]) -> int:
    """Worker-group starts at a larger world size than the group before."""
    return sum(1 for a, b in zip(starts, starts[1:]) if b["world_size"] > a["world_size"])


def format_summary(summary: dict) -> str:
    """Short human summary printed at the end of `finetune`."""
    if not summary["steps"]:
        at = (summary.get("resumed_at_steps") or [None])[-1]
        return (f"run {summary['run_name']}: nothing to do, the checkpoint is already at step {at} of "
                f"{summary['max_steps']} (raise train.max_steps, or use a new run.name for a fresh run)")
    lines = [
        f"run {summary['run_name']}: steps {summary['steps'][0] if summary['steps'] else '-'}"
        f"..{summary['final_step']} of {summary['max_steps']} in {summary['wall_time_s']:.1f} s",
        f"  loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}" if summary["steps"] else "  no steps ran",
        f"  throughput {summary['mean_tokens_per_s']:,.0f} non-padding tokens/s on {summary['world_size']} worker(s)"
        + (f", MFU {summary['mean_mfu']:.2%}" if summary.get("mean_mfu") is not None else ""),
        f"  checkpoint {summary['checkpoint']}",
    ]
    if summary.get("eval_loss") is not None:
        lines.append(f"  eval loss {summary['eval_loss']:.4f} (perplexity {summary['eval_perplexity']:.2f}) at step "
                     f"{summary['eval_steps'][-1]}" + (f"; best checkpoint {summary['best_checkpoint']['path']} "
                                                       f"(eval loss {summary['best_checkpoint']['eval_loss']:.4f})"
                                                       if summary.get("best_checkpoint") else ""))
    if summary.get("export_path"):
        lines.append(f"  exported model {summary['export_path']}")
    for stall in summary.get("stalls") or []:
        lines.append(f"  rank {stall['rank']} stalled in step {stall['step']} (bound {stall['bound_s']:.1f} s); "
                     f"the worker group was ended for a restart")
    return "\n".join(lines)
