"""LlamaTrainer: a validated Config → a Ray Train TorchTrainer run with a Ray Data
pipeline, live progress on the driver, and a run summary.

    from raytune_llama import LlamaTrainer, load_config
    summary = LlamaTrainer(load_config("examples/configs/tiny_cpu.yaml")).fit()
"""
from __future__ import annotations

import logging
import time

from raytune_llama import console
from raytune_llama.config import Config, ConfigError
from raytune_llama.testing.fault_injection import forwarded_env
from raytune_llama.trainer import cluster
from raytune_llama.trainer.data_audit import audit
from raytune_llama.trainer.run_dir import absolutize, existing_checkpoints, merge_step_history
from raytune_llama.trainer.run_events import step_records, summarize
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

        from raytune_llama.trainer.progress import ProgressPrinter
        from raytune_llama.trainer.trackers import open_trackers

        cfg = self.config
        self._check_resume_policy()
        started = time.time()
        p = cfg.parallel
        data = None
        own_cluster = cluster.connect(
            cfg.run.address, cluster.local_num_cpus(p.num_workers, p.cpus_per_worker, cfg.run.local_num_cpus)
        )
        try:
            model_path, tokenizer_path = self._model_files()
            # The layout is settled before any data is read: a bad layout fails in seconds.
            run_plan, workers = self._plan(model_path)
            perf = run_plan.performance()
            data = RunData.open(cfg, tokenizer_path)
            board, board_name = self._progress_board(started)
            trackers = open_trackers(cfg.run.trackers, cfg.run_dir, cfg.run.name, cfg.to_dict()) \
                if cfg.run.trackers else None
            printer = ProgressPrinter(board, on_checkpoint=lambda recs: self._write_report(
                recs, None, data, started, perf), on_record=trackers.record if trackers is not None else None).start()
            loop_config, env = self._loop_config(user_args, model_path, tokenizer_path, run_plan, data, board,
                                                 board_name, perf)
            if user_args is not None:  # the user's loop runs under the run's step watchdog too
                from raytune_llama.trainer.user_loop import guard_user_loop

                train_fn = guard_user_loop(train_fn, cfg.to_dict())
            trainer = self._torch_trainer(train_fn, loop_config, env, workers, board)
            try:
                result = trainer.fit()
            finally:
                records = printer.stop()
                ray.kill(board)
            summary = self._summary(records, result, data.info(), time.time() - started, perf)
            if trackers is not None:
                trackers.finish(summary)
        finally:
            if data is not None:
                data.stop()  # chunks not built yet are built by the next run that needs them
            if own_cluster:
                ray.shutdown()
        write_run_report(cfg.run_dir, summary, merge_step_history(cfg.run_dir, step_records(records)))
        return summary

    def _model_files(self) -> tuple[str, str]:
        """The model folder (created from model.random_init when asked) and the tokenizer's; a hub
        id resolves to its snapshot in the HF cache."""
        from raytune_llama.engine.hf_cache import resolve_pretrained
        from raytune_llama.engine.model_io import ensure_model

        m = self.config.model
        model_path = ensure_model(m.name_or_path, m.random_init, m.seed)
        return model_path, str(resolve_pretrained(m.tokenizer, "model.tokenizer")) if m.tokenizer else model_path

    def _plan(self, model_path: str):
        """The run's plan on the cluster Ray gives it (nodes, devices per node and accelerator from
        ray.nodes(), the workers placed as Ray Train places them: trainer/planning.py), and the
        worker count (a (min, max) range for an elastic run, every size of which has a layout)."""
        import ray

        from raytune_llama.trainer.planning import elastic_world_sizes, make_run_plan

        cfg, p = self.config, self.config.parallel
        ray_nodes = ray.nodes()
        run_plan = make_run_plan(cfg, model_path, ray_nodes)
        print(f"[raytune_llama] layout ({run_plan.source}): {run_plan.plan.describe()} on "
              f"{run_plan.cluster.describe()}", flush=True)
        if p.min_workers is None or p.min_workers >= p.num_workers:
            return run_plan, p.num_workers
        sizes = elastic_world_sizes(cfg, model_path, ray_nodes)
        print(f"[raytune_llama] elastic: {p.min_workers}..{p.num_workers} workers; the global batch "
              f"of {cfg.train.global_batch_size} is kept at sizes {sorted(sizes)}", flush=True)
        return run_plan, (p.min_workers, p.num_workers)

    def _progress_board(self, started: float):
        """The actor the workers push step records and events to, on the driver's node (the head,
        for Ray client and job drivers), as Ray Train places its controller: a board on a worker
        node would die with that node, and with it every record the run summary is built from."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from raytune_llama.trainer.progress import ProgressBoard

        name = f"raytune_llama_progress_{self.config.run.name}_{int(started * 1000)}"
        board = ProgressBoard.options(name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
        return board, name

    def _loop_config(self, user_args, model_path, tokenizer_path, run_plan, data, board, board_name, perf):
        """What each worker's loop gets: its train_loop_config and environment variables."""
        cfg = self.config
        env = {} if cfg.parallel.use_gpu else {"DS_ACCELERATOR": "cpu"}  # CPU: DeepSpeed must not probe GPUs
        env.update(forwarded_env())  # fault injection set on the driver (testing/fault_injection.py)
        env.update(console.worker_env())  # --verbose reaches the workers (raytune_llama/console.py)
        if user_args is not None:
            from raytune_llama.trainer.user_loop import user_loop_env

            env.update(user_loop_env(run_plan.plan, board_name, data.info().store_path, cfg))
            return {**user_args, "model_path": model_path, "tokenizer_path": tokenizer_path}, env
        return {
            "config": cfg.to_dict(), "model_path": model_path, "tokenizer_path": tokenizer_path,
            "export_path": str(cfg.export_path), "token_store": data.info().store_path,
            "eval_store": data.eval_store, "progress_board": board, "performance": perf,
            "plan": run_plan.plan.to_dict(),
            "cluster": run_plan.cluster.to_dict(),  # what the plan assumed; the workers check it
        }, env

    def _torch_trainer(self, train_fn, loop_config: dict, env: dict, workers, board):
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from raytune_llama.trainer.progress import failure_reporter

        cfg, p = self.config, self.config.parallel
        return TorchTrainer(
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
                callbacks=[failure_reporter(board), *self.callbacks],
                worker_runtime_env={"env_vars": env} if env else None,
            ),
        )

    def _write_report(self, records: list[dict], result, data: "RunData", started: float, perf: dict) -> None:
        """summary.json + loss.png as of a checkpoint (the final report overwrites them)."""
        summary = self._summary(records, result, data.info(), time.time() - started, perf)
        write_run_report(self.config.run_dir, summary, merge_step_history(self.config.run_dir, step_records(records)))

    def _summary(self, records: list[dict], result, info, wall_s: float, perf: dict) -> dict:
        """The run summary: what the events say (run_events.summarize) and the run's own facts."""
        cfg = self.config
        summary = summarize(records)
        checkpoint = getattr(result, "checkpoint", None)
        summary.update({
            "run_name": cfg.run.name,
            "max_steps": cfg.train.max_steps,
            "wall_time_s": wall_s,
            "dataset_sequences": info.num_samples,  # None while the store is still being built
            "docs_skipped": info.docs_skipped,
            "token_store": info.store_path,
            "data_chunks": [info.chunks_built, info.chunks],
            "data_audit": audit(records),  # data.id_column: the committed steps' document ids, in order
            "checkpoint": checkpoint.path if checkpoint is not None else None,
            "export_path": str(cfg.export_path) if summary["final_step"] == cfg.train.max_steps else None,
            # the layout the last worker group ran (re-planned after a resize or on another
            # placement than the driver planned for), else the driver's
            "layout": next((x for x in reversed(summary["layout_history"]) if x), perf["layout"]),
            **eval_summary(step_records(records), cfg.run_dir),
        })
        return summary


class RunData:
    """The run's token stores (training and validation), their background builders, and the
    dataset line printed before training starts."""

    def __init__(self, cfg: Config, store, builder, eval_store, eval_builder):
        self.cfg, self.store, self.builder = cfg, store, builder
        self.eval_store, self.eval_builder = eval_store, eval_builder

    @classmethod
    def open(cls, cfg: Config, tokenizer_path: str) -> "RunData":
        """Open (tokenizing in the background what is not built yet) and wait until the first
        global batch can be read; bad data is a ConfigError naming the problem."""
        import ray

        from raytune_llama.trainer.data_pipeline import (StoreBuilder, open_eval_data, open_token_store,
                                                          store_root, wait_for_first_batch)

        d, p = cfg.data, cfg.parallel
        builder = None
        try:  # the corpus's chunks and its token store (tokenized once per content + tokenizer + seq_len)
            store = open_token_store(d, tokenizer_path, store_root(d, cfg.run.storage_path))
            cpus_free = ray.cluster_resources().get("CPU", 0) - p.num_workers * p.cpus_per_worker
            builder = StoreBuilder(store, tokenizer_path, d.shuffle_seed, d.shuffle, cpus_free=cpus_free).start()
            wait_for_first_batch(store, d, cfg.train.global_batch_size)
            eval_store, eval_builder = open_eval_data(d, tokenizer_path, store, cfg.run.storage_path,
                                                      cpus_free=cpus_free)
        except ValueError as exc:  # an empty dataset, a column that is not there, an unreadable file
            if builder is not None:
                builder.stop()
            raise ConfigError([str(exc)]) from exc
        data = cls(cfg, store, builder, eval_store, eval_builder)
        info = data.info()
        print(f"[raytune_llama] data: {_describe_data(info, len(builder.pending))} from {d.path}"
              + (f"; skipped {info.docs_skipped:,} rows without usable text (empty, missing or not a "
                 f"string in column {d.text_column!r})" if info.docs_skipped else ""), flush=True)
        return data

    def info(self):
        """DatasetInfo as of now (chunks may still be building)."""
        from raytune_llama.trainer.data_pipeline import dataset_info

        return dataset_info(self.store, self.cfg.data)

    def stop(self) -> None:
        for b in (self.builder, self.eval_builder):
            if b is not None:
                b.stop()


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
