"""`raytune-llama sweep`'s pure parts: parameter specs, the metric choice, trial configs, the
results table and plot (trainer/sweep.py)."""
import json

import pytest

from raytune_llama.config import ConfigError, load_config
from raytune_llama.trainer.sweep import Param, format_report, parse_param, plot_trials, results_csv, sweep_metric, \
    trial_config


def test_parameter_specs_parse_into_distributions():
    assert parse_param("train.lr=loguniform:1e-5:1e-3") == Param("train.lr", "loguniform", (1e-5, 1e-3))
    assert parse_param("train.warmup_steps=randint:0:20") == Param("train.warmup_steps", "randint", (0, 20))
    assert parse_param("train.lr=grid:3e-3,1e-4").values == (3e-3, 1e-4)  # numbers, though YAML 1.1 reads strings
    assert parse_param("data.packing=choice:documents,naive").values == ("documents", "naive")
    from ray.tune.search.sample import Float

    assert isinstance(parse_param("train.lr=uniform:0.1:0.2").space(), Float)


@pytest.mark.parametrize("text, message", [
    ("train.lr", "expected --param SECTION.KEY=KIND:ARGS"),
    ("train.learning_rate=uniform:1:2", "'train.learning_rate' is not a config field"),
    ("train.lr=normal:1:2", "unknown kind 'normal'"),
    ("train.lr=loguniform:0:1", "LOW < HIGH and LOW > 0"),
    ("train.lr=uniform:2:1", "uniform takes LOW:HIGH with LOW < HIGH"),
])
def test_bad_parameter_specs_name_the_flag(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_param(text)


def test_the_metric_is_the_validation_loss_when_there_is_validation_data():
    chat = load_config("examples/configs/tiny_chat.yaml")
    text = load_config("examples/configs/tiny_cpu.yaml")
    assert sweep_metric(chat, None) == "eval_loss" and sweep_metric(text, None) == "loss"
    with pytest.raises(ConfigError, match="--metric eval_loss: the config has no validation data"):
        sweep_metric(text, "eval_loss")


def test_a_trial_gets_the_sampled_values_and_its_own_run_name():
    base = load_config("examples/configs/tiny_chat.yaml").to_dict()
    cfg = trial_config(base, {"train.lr": 1e-4, "train.warmup_steps": 0}, "tiny-chat-sweep-abc_00001")
    assert cfg.train.lr == 1e-4 and cfg.train.warmup_steps == 0 and cfg.run.name == "tiny-chat-sweep-abc_00001"
    assert base["train"]["lr"] == 3e-3  # the base is left as it was


def test_report_files(tmp_path):
    params = [parse_param("train.lr=grid:1e-3,1e-5")]
    trials = [
        {"trial": "t0", "params": {"train.lr": 1e-3}, "status": "finished", "steps": 9, "loss": 2.0, "eval_loss": 2.1,
         "history": [{"step": 3, "loss": 4.0, "eval_loss": 4.1}, {"step": 9, "loss": 2.0, "eval_loss": 2.1}]},
        {"trial": "t1", "params": {"train.lr": 1e-5}, "status": "stopped early", "steps": 3, "loss": 6.0,
         "eval_loss": 6.1, "history": [{"step": 3, "loss": 6.0, "eval_loss": 6.1}]},
    ]
    rows = results_csv(trials, params, "eval_loss").splitlines()
    assert rows[0] == "trial,train.lr,status,steps,loss,eval_loss" and rows[2].startswith("t1,1e-05,stopped early,3")
    plot_trials(trials, "eval_loss", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    best = {**trials[0], "run_dir": "/r/x", "checkpoint": "/r/x/checkpoint_1", "config_overrides": ["train.lr=0.001"]}
    text = format_report({"metric": "eval_loss", "trials": trials, "best": best, "out_dir": str(tmp_path)})
    assert text.splitlines()[1].startswith("t0") and "best: " + json.dumps({"train.lr": 1e-3}) in text
    assert "--set 'train.lr=0.001'" in text
