"""Experiment trackers (MLflow, TensorBoard, W&B) fed from the driver's record of a run.

The driver hands every record it receives from rank 0 (step records, evaluations, checkpoints,
worker-group starts) to one RunTrackers, and the run's summary at the end:

    trackers = open_trackers(cfg.run.trackers, cfg.run_dir, cfg.run.name, cfg.to_dict())
    trackers.record({"step": 3, "loss": 5.1, "lr": 1e-3, "tokens_per_s": 20000.0, ...})
    trackers.record({"event": "eval", "step": 10, "eval_loss": 4.2, "eval_perplexity": 66.7})
    trackers.finish({"status": "finished", "final_loss": 1.9, ...})

Everything is offline by default, written under the run's directory (STORAGE/NAME/mlruns,
STORAGE/NAME/tensorboard, STORAGE/NAME/wandb); docs/trackers.md says what is logged, how to view
it and how to point a tracker at a server. Each record is logged as it arrives (nothing is
buffered), and a tracker that fails is turned off with one warning: a tracker never stops
training. The tracker libraries are imported only when a run asks for them.
"""
from __future__ import annotations

import json
import logging
import numbers
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from raytune_llama.tracker_settings import KNOWN_TRACKERS

log = logging.getLogger(__name__)

# Step-record keys that are not metrics of the step: the x axis itself and the run's target.
NOT_STEP_METRICS = frozenset({"step", "max_steps"})
EVAL_METRICS = ("eval_loss", "eval_perplexity", "eval_tokens")
# MLflow's limits: a param value's length, and params per log_batch call.
MLFLOW_MAX_PARAM_LENGTH = 6000
MLFLOW_PARAMS_PER_BATCH = 100
MLFLOW_RUN_ID_FILE = "mlflow_run_id"
WANDB_RUN_ID_FILE = "wandb_run_id"


# ---------------------------------------------------------------------------------------------
# Values


def _number(value: Any) -> Optional[float]:
    """A plain float for int/float (numpy scalars included); None for bools and anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def numeric_items(rec: dict, skip: Iterable[str] = ()) -> dict[str, float]:
    """The record's numeric values (bools, strings, lists and None left out)."""
    skip = set(skip)
    out = {}
    for key, value in rec.items():
        number = _number(value)
        if key not in skip and number is not None:
            out[key] = number
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys: {"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def param_text(value: Any) -> str:
    """A config value as text, written as one would pass it to --set (YAML: null, true, [..])."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def summary_metrics(summary: dict) -> dict[str, float]:
    """The summary's numeric scalars, nested dicts flattened to dotted keys."""
    return numeric_items(flatten(summary or {}))


def run_status(summary: dict) -> str:
    """FINISHED | FAILED | KILLED from the summary's status (a finished run when it has none)."""
    status = str((summary or {}).get("status") or "finished").lower()
    if "fail" in status or "error" in status:
        return "FAILED"
    if any(word in status for word in ("kill", "interrupt", "cancel", "abort")):
        return "KILLED"
    return "FINISHED"


def _read_id(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _write_id(path: Path, run_id: str) -> None:
    from raytune_llama.engine.atomic_files import write_bytes_atomic

    write_bytes_atomic(path, (run_id + "\n").encode())


# ---------------------------------------------------------------------------------------------
# Backends: one class per tracker, each with the same five calls. RunTrackers guards every call.


class MlflowTracker:
    """One MLflow run in the experiment named after the run; metrics keyed by step.

    Tracking URI: MLFLOW_TRACKING_URI when set, else a file store at RUN_DIR/mlruns. The run id
    is kept in RUN_DIR/mlflow_run_id, so a restarted driver goes on logging into the same run."""

    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        from mlflow.tracking import MlflowClient

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(self._tracking_uri())
        experiment_id = self._experiment_id(run_name)
        self.run_id = self._resume(experiment_id) or self._create(experiment_id, run_name)
        _write_id(self.run_dir / MLFLOW_RUN_ID_FILE, self.run_id)
        self._log_params(flatten(config or {}))

    def _tracking_uri(self) -> Optional[str]:
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return None  # the user's server (MlflowClient reads the variable)
        # MLflow refuses a file store unless this is set; our own store is what we ask for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return (self.run_dir / "mlruns").resolve().as_uri()

    def _experiment_id(self, run_name: str) -> str:
        experiment = self.client.get_experiment_by_name(run_name)
        if experiment is None:
            return self.client.create_experiment(run_name)
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _resume(self, experiment_id: str) -> Optional[str]:
        run_id = _read_id(self.run_dir / MLFLOW_RUN_ID_FILE)
        if run_id is None:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception:  # another tracking server, or the run was removed: start a new one
            return None
        if run.info.experiment_id != experiment_id or run.info.lifecycle_stage == "deleted":
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _create(self, experiment_id: str, run_name: str) -> str:
        return self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def _log_params(self, config: dict[str, Any]) -> None:
        """Params are write-once in MLflow: on a resumed run only new keys are logged, and a
        value that changed since (e.g. train.stop_after_steps) goes to a tag config_changed.KEY."""
        from mlflow.entities import Param, RunTag

        logged = self.client.get_run(self.run_id).data.params
        params, tags = [], []
        for key, value in config.items():
            text = param_text(value)[:MLFLOW_MAX_PARAM_LENGTH]
            if key not in logged:
                params.append(Param(key, text))
            elif logged[key] != text:
                tags.append(RunTag(f"config_changed.{key}", text))
        for start in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MLFLOW_PARAMS_PER_BATCH])
        if tags:
            self.client.log_batch(self.run_id, tags=tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_checkpoint(self, step: int, path: str) -> None:
        from mlflow.entities import Metric, RunTag

        self.client.log_batch(self.run_id, metrics=[Metric("checkpoint_step", float(step), int(time.time() * 1000), step)],
                              tags=[RunTag("checkpoint_path", str(path))])

    def log_start(self, step: int, world_size: Any, layout: Any) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag("layout", str(layout)), RunTag("world_size", str(world_size)),
                                                 RunTag("worker_group_started_at_step", str(step))])

    def finish(self, summary: dict, step: int) -> None:
        from mlflow.entities import RunTag

        self.log_metrics({f"summary.{k}": v for k, v in summary_metrics(summary).items()}, step)
        if summary.get("status") is not None:
            self.client.log_batch(self.run_id, tags=[RunTag("status", str(summary["status"]))])
        self.client.set_terminated(self.run_id, run_status(summary))

    def close(self) -> None:
        """Without finish (the driver ended early): the run is marked KILLED."""
        self.client.set_terminated(self.run_id, "KILLED")


class TensorBoardTracker:
    """Event files under RUN_DIR/tensorboard (torch's SummaryWriter); scalars tagged by record key.
    A restarted step is written again: TensorBoard shows both points at that step."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), flush_secs=30)
        self.writer.add_text("config", "```\n" + json.dumps(config or {}, indent=1, default=str) + "\n```", 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_checkpoint(self, step: int, path: str) -> None:
        self.writer.add_text("checkpoint", f"step {step}: {path}", step)

    def log_start(self, step: int, world_size: Any, layout: Any) -> None:
        self.writer.add_text("worker_group", f"started at step {step} on {world_size} worker(s), layout {layout}", step)

    def finish(self, summary: dict, step: int) -> None:
        for key, value in summary_metrics(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, step)
        self.writer.add_text("status", str(summary.get("status", "finished")), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run (offline unless WANDB_MODE is set) under RUN_DIR/wandb, project = run name.
    Metrics are plotted against their own "step" metric, so a re-run step can be logged again."""

    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / WANDB_RUN_ID_FILE
        run_id = _read_id(id_file) or wandb.util.generate_id()
        self.run = wandb.init(project=run_name, name=run_name, dir=str(run_dir), config=config,
                              mode=None if os.environ.get("WANDB_MODE") else "offline",
                              id=run_id, resume="allow")
        _write_id(id_file, run_id)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "step": step})

    def log_checkpoint(self, step: int, path: str) -> None:
        self.run.log({"checkpoint_step": step, "step": step})
        self.run.summary["checkpoint_path"] = str(path)

    def log_start(self, step: int, world_size: Any, layout: Any) -> None:
        self.run.summary.update({"layout": str(layout), "world_size": world_size,
                                 "worker_group_started_at_step": step})

    def finish(self, summary: dict, step: int) -> None:
        self.run.summary.update(summary_metrics(summary))
        if summary.get("status") is not None:
            self.run.summary["status"] = str(summary["status"])
        self.run.finish(exit_code=0 if run_status(summary) == "FINISHED" else 1)

    def close(self) -> None:
        self.run.finish(exit_code=1)


BACKENDS = {"mlflow": MlflowTracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker}


# ---------------------------------------------------------------------------------------------
# What the driver uses


class RunTrackers:
    """The run's open trackers. record() and finish() never raise: a backend whose call fails
    is logged once and turned off for the rest of the run."""

    def __init__(self, backends: list):
        self.backends = list(backends)
        self.last_step = 0
        self._finished = False
        self._lock = threading.Lock()  # the progress thread records while the driver finishes

    @property
    def names(self) -> list[str]:
        """Names of the trackers still logging."""
        return [backend.name for backend in self.backends]

    def record(self, rec: dict) -> None:
        """Log one driver record: a step record (no "event" key), or an eval, checkpoint or
        start event; other events (stall, data, ...) are not logged."""
        event, step = rec.get("event"), _number(rec.get("step"))
        if step is None:
            return
        step = int(step)
        with self._lock:
            self.last_step = max(self.last_step, step)
            if event is None:
                metrics = numeric_items(rec, NOT_STEP_METRICS)
                if metrics:
                    self._each("log_metrics", metrics, step)
            elif event == "eval":
                metrics = numeric_items({k: rec[k] for k in EVAL_METRICS if k in rec})
                if metrics:
                    self._each("log_metrics", metrics, step)
            elif event == "checkpoint":
                self._each("log_checkpoint", step, str(rec.get("path")))
            elif event == "start":
                self._each("log_start", step, rec.get("world_size"), rec.get("layout"))

    def finish(self, summary: dict) -> None:
        """Log the summary's numeric values and the run's status, then close every tracker."""
        with self._lock:
            if self._finished:
                return
            summary = summary or {}
            last = _number(summary.get("final_step"))
            step = int(last) if last is not None else self.last_step
            self._each("finish", summary, step)
            self.backends, self._finished = [], True

    def close(self) -> None:
        """Close every tracker still open (a run that ended without finish: marked killed)."""
        with self._lock:
            self._each("close")
            self.backends, self._finished = [], True

    def __enter__(self) -> "RunTrackers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _each(self, method: str, *args) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # a tracker must never stop training
                log.warning("%s tracker failed in %s (%s: %s); it is turned off for the rest of this run",
                            backend.name, method, type(exc).__name__, exc)
                self.backends.remove(backend)


def open_trackers(kinds: list[str], run_dir: Path, run_name: str, config: dict) -> RunTrackers:
    """Open the named trackers for this run (config: the whole run config as a nested dict,
    logged once as params). A tracker that cannot open is warned about and left out."""
    backends = []
    for kind in dict.fromkeys(kinds or []):
        cls = BACKENDS.get(kind)
        if cls is None:
            log.warning("run.trackers: unknown tracker %r left out; known trackers are %s",
                        kind, ", ".join(KNOWN_TRACKERS))
            continue
        try:
            backends.append(cls(Path(run_dir), run_name, config))
        except Exception as exc:
            log.warning("%s tracker could not start (%s: %s); the run goes on without it",
                        kind, type(exc).__name__, exc)
    return RunTrackers(backends)
