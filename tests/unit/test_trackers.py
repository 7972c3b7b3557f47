"""Experiment trackers (trainer/trackers.py): records fed to the real MLflow and TensorBoard
libraries, read back from the files they wrote, values and steps compared exactly."""
import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest

from raytune_llama.config import Config, load_config
from raytune_llama.trainer import trackers
from raytune_llama.tracker_settings import tracker_problems
from raytune_llama.trainer.trackers import open_trackers

RUN = "tracked-run"
LONG_TEMPLATE = "x" * 9000  # longer than any MLflow param value may be


def step_record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3 * step, "grad_norm": 0.5 + step / 10, "step_time_s": 0.08,
            "tokens_per_s": 20000.0 + step, "tokens_seen": 1000 * step, "samples_seen": 8 * step, "epoch": 0,
            "world_size": 2, "max_steps": 6, "mfu": 0.01 * step, "peak_memory_bytes": 123, "checkpoint": step == 4}


# A run that restarts after step 6: the worker group resumes from the step-4 checkpoint and runs
# steps 5 and 6 again (other losses), so those steps arrive twice.
RECORDS = (
    [{"event": "start", "step": 0, "world_size": 2, "layout": "ddp dp=2", "time": 1.0}]
    + [step_record(s, 6.0 - s * 0.5) for s in range(1, 5)]
    + [{"event": "eval", "step": 4, "eval_loss": 4.25, "eval_perplexity": 70.1, "eval_tokens": 5000},
       {"event": "checkpoint", "step": 4, "path": "/runs/tracked-run/checkpoint_000000", "eval_loss": 4.25},
       {"event": "data", "step": 4, "attempt": 1.0, "rank": 0, "dp_rank": 0, "ids": ["a"]}]
    + [step_record(5, 3.5), step_record(6, 3.1)]
    + [{"event": "stall", "rank": 1, "step": 7, "waited_s": 30.0, "bound_s": 20.0},
       {"event": "start", "step": 4, "world_size": 1, "layout": "single", "time": 2.0}]
    + [step_record(5, 3.4), step_record(6, 3.0)]
)
LOSSES = [(r["step"], r["loss"]) for r in RECORDS if "event" not in r]
SUMMARY = {"status": "finished", "steps": [5, 6], "final_step": 6, "final_loss": 3.0,
           "throughput_tokens_per_s": 26000.0, "eval_loss": 4.25, "checkpoint": None,
           "data": {"chunks": 3, "store": "/tmp/store"}}


@pytest.fixture
def clean_env(monkeypatch):
    """No user tracking settings; whatever open_trackers sets is undone after the test."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "WANDB_MODE"):
        # setenv first: delenv of an unset variable records nothing to undo, and the code under
        # test sets MLFLOW_ALLOW_FILE_STORE, which must be gone again after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def run_config() -> dict:
    config = Config().to_dict()
    config["data"]["prompt_template"] = LONG_TEMPLATE
    config["train"]["lora"] = {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    return config


def feed(kinds: list[str], run_dir: Path, records=RECORDS, summary=SUMMARY, config=None):
    tracked = open_trackers(kinds, run_dir, RUN, config if config is not None else run_config())
    assert tracked.names == kinds
    for rec in records:
        tracked.record(rec)
    if summary is not None:
        tracked.finish(summary)
    return tracked


def mlflow_run(store: Path):
    """The client of an MLflow file store and the one run of experiment RUN in it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.resolve().as_uri())
    experiment = client.get_experiment_by_name(RUN)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_mlflow_metrics_params_tags_read_back(tmp_path, clean_env):
    feed(["mlflow"], tmp_path)
    client, run = mlflow_run(tmp_path / "mlruns")
    assert run.info.status == "FINISHED" and run.info.run_name == RUN
    assert (tmp_path / "mlflow_run_id").read_text().strip() == run.info.run_id

    assert history(client, run, "loss") == sorted(LOSSES)  # steps 5 and 6 logged twice
    steps = [r for r in RECORDS if "event" not in r]
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s", "tokens_seen", "mfu", "world_size"):
        assert history(client, run, key) == sorted((r["step"], float(r[key])) for r in steps), key
    assert "max_steps" not in run.data.metrics and "checkpoint" not in run.data.metrics
    assert history(client, run, "eval_loss") == [(4, 4.25)]
    assert history(client, run, "eval_perplexity") == [(4, 70.1)]
    assert history(client, run, "checkpoint_step") == [(4, 4.0)]
    assert run.data.tags["checkpoint_path"] == "/runs/tracked-run/checkpoint_000000"
    assert run.data.tags["layout"] == "single" and run.data.tags["world_size"] == "1"  # the last start

    assert history(client, run, "summary.final_loss") == [(6, 3.0)]
    assert history(client, run, "summary.throughput_tokens_per_s") == [(6, 26000.0)]
    assert history(client, run, "summary.data.chunks") == [(6, 3.0)]
    assert run.data.tags["status"] == "finished"

    params = run.data.params
    assert params["train.lr"] == "0.001" and params["train.max_steps"] == "60"
    assert params["train.betas"] == "[0.9, 0.95]" and params["model.tokenizer"] == "null"
    assert params["train.lora.r"] == "8" and params["train.lora.target_modules"] == '["q_proj", "v_proj"]'
    assert params["data.prompt_template"] == LONG_TEMPLATE[:6000]  # truncated, not refused
    assert len(params) == len(trackers.flatten(run_config()))


def test_mlflow_resumes_the_same_run_after_a_driver_restart(tmp_path, clean_env):
    first = feed(["mlflow"], tmp_path, records=[step_record(1, 5.0), step_record(2, 4.0)], summary=None)
    first.close()  # the driver died without a summary
    _, run = mlflow_run(tmp_path / "mlruns")
    assert run.info.status == "KILLED"

    changed = run_config()
    changed["train"]["stop_after_steps"] = 10
    feed(["mlflow"], tmp_path, records=[step_record(3, 3.0)], summary={"status": "failed"}, config=changed)
    client, run = mlflow_run(tmp_path / "mlruns")  # still one run
    assert run.info.status == "FAILED"
    assert history(client, run, "loss") == [(1, 5.0), (2, 4.0), (3, 3.0)]
    assert run.data.params["train.stop_after_steps"] == "null"  # params are write-once
    assert run.data.tags["config_changed.train.stop_after_steps"] == "10"


def test_mlflow_logs_to_the_users_tracking_uri(tmp_path, clean_env):
    elsewhere = tmp_path / "server_store"
    clean_env.setenv("MLFLOW_TRACKING_URI", elsewhere.as_uri())
    clean_env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's own file store
    feed(["mlflow"], tmp_path / "run")
    assert not (tmp_path / "run" / "mlruns").exists()
    client, run = mlflow_run(elsewhere)
    assert history(client, run, "loss") == sorted(LOSSES)


def tensorboard_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def as_float32(pairs) -> list[tuple[int, float]]:
    """TensorBoard stores scalars as float32."""
    return [(step, float(np.float32(value))) for step, value in pairs]


def texts(events, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(f"{tag}/text_summary")]


def test_tensorboard_scalars_and_texts_read_back(tmp_path, clean_env):
    feed(["tensorboard"], tmp_path)
    events = tensorboard_events(tmp_path)
    assert scalars(events, "loss") == as_float32(LOSSES)  # in arrival order, re-run steps included
    steps = [r for r in RECORDS if "event" not in r]
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s", "tokens_seen", "mfu"):
        assert scalars(events, key) == as_float32((r["step"], r[key]) for r in steps), key
    assert "max_steps" not in events.Tags()["scalars"]
    assert scalars(events, "eval_loss") == [(4, 4.25)]
    assert scalars(events, "eval_perplexity") == as_float32([(4, 70.1)])
    assert scalars(events, "summary/final_loss") == [(6, 3.0)]
    assert scalars(events, "summary/throughput_tokens_per_s") == [(6, 26000.0)]
    assert texts(events, "checkpoint") == [(4, "step 4: /runs/tracked-run/checkpoint_000000")]
    assert texts(events, "worker_group") == [(0, "started at step 0 on 2 worker(s), layout ddp dp=2"),
                                             (4, "started at step 4 on 1 worker(s), layout single")]
    assert texts(events, "status") == [(6, "finished")]


def test_a_failing_backend_is_turned_off_with_one_warning(tmp_path, clean_env, caplog):
    tracked = open_trackers(["mlflow", "tensorboard"], tmp_path, RUN, run_config())
    mlflow_backend = tracked.backends[0]

    def refuse(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    clean_env.setattr(mlflow_backend.client, "log_batch", refuse)
    with caplog.at_level(logging.WARNING, logger=trackers.__name__):
        for rec in RECORDS:
            tracked.record(rec)
        tracked.finish(SUMMARY)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "mlflow tracker failed" in warnings[0] and "unreachable" in warnings[0]
    assert scalars(tensorboard_events(tmp_path), "loss") == as_float32(LOSSES)  # the other one went on


def test_a_tracker_that_cannot_open_is_left_out(tmp_path, clean_env, caplog):
    clean_env.setenv("MLFLOW_ALLOW_FILE_STORE", "false")  # MLflow then refuses its file store
    with caplog.at_level(logging.WARNING, logger=trackers.__name__):
        tracked = open_trackers(["mlflow", "tensorboard"], tmp_path, RUN, run_config())
    assert tracked.names == ["tensorboard"]
    assert any("mlflow tracker could not start" in r.getMessage() for r in caplog.records)
    tracked.record(step_record(1, 5.0))
    tracked.finish(SUMMARY)


class Recorder:
    """A backend that remembers its calls."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        return lambda *args: self.calls.append((method, *args))


def test_records_are_routed_by_event_and_only_numbers_are_logged():
    backend = Recorder()
    tracked = trackers.RunTrackers([backend])
    tracked.record({"step": np.int64(3), "loss": np.float32(2.5), "note": "text", "ok": True, "none": None,
                    "max_steps": 9})
    tracked.record({"event": "eval", "step": 3, "eval_loss": 2.0, "eval_perplexity": 7.4, "other": 1})
    tracked.record({"event": "checkpoint", "step": 3, "path": "/c"})
    tracked.record({"event": "stall", "rank": 0, "step": 4, "waited_s": 1.0, "bound_s": 1.0})
    tracked.record({"event": "data", "step": 4, "ids": []})
    tracked.finish({"status": "finished", "final_loss": 1.0})
    tracked.finish({"status": "finished"})  # a second finish and a close do nothing
    tracked.close()
    assert backend.calls == [
        ("log_metrics", {"loss": 2.5}, 3),
        ("log_metrics", {"eval_loss": 2.0, "eval_perplexity": 7.4}, 3),
        ("log_checkpoint", 3, "/c"),
        ("finish", {"status": "finished", "final_loss": 1.0}, 4),
    ]


def test_summary_numbers_and_status():
    summary = {"status": "failed", "loss": 1.5, "steps": [1, 2], "ok": True, "nested": {"a": 2, "b": None}}
    assert trackers.summary_metrics(summary) == {"loss": 1.5, "nested.a": 2.0}
    assert trackers.run_status(summary) == "FAILED"
    assert trackers.run_status({"status": "interrupted"}) == "KILLED"
    assert trackers.run_status({}) == "FINISHED"


def test_tracker_problems_name_the_field_value_and_fix(monkeypatch):
    assert tracker_problems([]) == [] and tracker_problems(["mlflow", "tensorboard"]) == []
    assert tracker_problems("mlflow") == [
        "run.trackers: expected a list of tracker names, got the string 'mlflow'; "
        "write it as a list: --set 'run.trackers=[\"mlflow\"]'"]
    assert tracker_problems(None) == [
        "run.trackers: expected a list of tracker names, got None; use e.g. "
        "--set 'run.trackers=[\"mlflow\", \"tensorboard\"]' (or [] for none)"]
    assert tracker_problems(["MLflow", "neptune", "tensorboard", "tensorboard"]) == [
        "run.trackers: unknown tracker 'MLflow' (did you mean 'mlflow'?); known trackers are mlflow, tensorboard, wandb",
        "run.trackers: unknown tracker 'neptune'; known trackers are mlflow, tensorboard, wandb",
        "run.trackers: 'tensorboard' is listed 2 times; list each tracker once",
    ]

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "mlflow") else real_find_spec(name, *a))
    assert tracker_problems(["wandb", "tensorboard", "mlflow"]) == [
        "run.trackers: 'wandb' needs the wandb package: pip install wandb",
        "run.trackers: 'mlflow' needs the mlflow package: pip install mlflow-skinny",
    ]


def test_trackers_parse_from_set_override():
    cfg = load_config(None, overrides=['run.trackers=["mlflow", "tensorboard"]'])
    assert cfg.run.trackers == ["mlflow", "tensorboard"]
    assert load_config(None).run.trackers == []


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_writes_an_offline_run(tmp_path, clean_env):
    clean_env.setenv("WANDB_SILENT", "true")
    feed(["wandb"], tmp_path)
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    assert (tmp_path / "wandb_run_id").read_text().strip() in offline_runs[0].name
