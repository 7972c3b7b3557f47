"""Config loading, dotted overrides and the validation matrix (one error, every problem)."""
from pathlib import Path

import pytest
import yaml

from raytune_llama.config import ConfigError, config_from_dict, load_config
from raytune_llama.engine.hf_cache import looks_like_hub_id

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def test_tiny_config_loads_with_overrides():
    cfg = load_config(TINY, ["train.max_steps=7", "train.lr=1e-4", "run.name=abc", "train.betas=[0.8, 0.9]"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1e-4 and cfg.run.name == "abc"
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.data.seq_len == 128


def test_unknown_keys_and_sections_are_all_reported():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"max_step": 3, "lr": 1e-3}, "bogus": {}, "data": {"seqlen": 4}})
    msg = str(err.value)
    assert "train.max_step: unknown key" in msg and "data.seqlen: unknown key" in msg
    assert "bogus: unknown section" in msg and len(err.value.problems) == 3


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        load_config(TINY, ["max_steps=3"])


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_validation_matrix_reports_every_problem_once(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "hello"}\n')
    cfg = load_config(TINY, [
        "train.global_batch_size=0", "parallel.layout=tp2", "parallel.num_workers=2",
        "train.lr=-1", "data.seq_len=0", f"data.path={data}", "model.name_or_path=/no/such/model",
        "model.random_init=null", "checkpoint.resume=sometimes", "train.max_steps=2.5",
    ])
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    problems = err.value.problems
    text = "\n".join(problems)
    assert "train.global_batch_size: 0 must be >= 1" in text
    assert "parallel.layout: 'tp2' must be like" in text
    assert "train.lr: -1.0 must be > 0" in text
    assert "data.seq_len: 0 must be >= 2" in text
    assert "data.text_column: column 'text' is not in" in text and "['body']" in text
    assert "model.name_or_path: '/no/such/model' does not exist" in text
    assert "checkpoint.resume: 'sometimes' is not one of" in text
    assert "train.max_steps: expected a whole number, got 2.5" in text
    assert len(problems) == 8, text


def test_missing_data_path_and_unknown_preset(tmp_path):
    cfg = load_config(TINY, [f"data.path={tmp_path}/missing.jsonl", "model.random_init=gpt-17"])
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    assert "data.path:" in text and "missing.jsonl' does not exist" in text
    assert "model.random_init: unknown preset 'gpt-17'" in text


def test_hub_ids_must_be_in_the_local_cache(tmp_path, monkeypatch):
    cfg = load_config(TINY, ["model.name_or_path=meta-llama/Meta-Llama-3-8B", "model.random_init=null"])
    cfg.validate(check_files=False)  # a Ray client checks files on the cluster, not here
    from raytune_llama.config_paths import model_problems

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    problems = model_problems(cfg.model)
    assert len(problems) == 1 and "hf download meta-llama/Meta-Llama-3-8B" in problems[0]


def shipped_yamls():
    return sorted(p for d in ("examples", "cluster") for p in (REPO / d).rglob("*.yaml"))


@pytest.mark.parametrize("path", shipped_yamls(), ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_yaml_parses_and_validates(path, monkeypatch, tmp_path):
    """Bad input: every YAML in examples/ and cluster/ parses; run configs also validate."""
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), path
    if path.parent.name == "configs":
        monkeypatch.chdir(REPO)
        cfg = load_config(path)
        if looks_like_hub_id(cfg.model.name_or_path) and not cfg.model.random_init:
            # A hub model must be in the local HF cache: lay a tiny one out under its id.
            from raytune_llama.presets import preset_config
            from tests.hf_cache_layout import write_hub_model

            monkeypatch.setenv("HF_HOME", str(tmp_path))
            monkeypatch.delenv("HF_HUB_CACHE", raising=False)
            monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
            write_hub_model(tmp_path, cfg.model.name_or_path, preset_config("tiny-llama"))
        cfg.validate()


def test_schema_is_the_dataclasses_and_the_planner_lists():
    """Allowed values come from the field metadata and the planner's own lists: every shipped
    hardware profile and model preset is accepted, types follow the annotations."""
    from raytune_llama.config import Config
    from raytune_llama.planner.hardware import builtin_names
    from raytune_llama.planner.model_spec import registry_names

    for hw in builtin_names():
        cfg = Config()
        cfg.parallel.hardware = hw
        assert cfg.problems(check_files=False) == [], hw
    for preset in registry_names():
        cfg = Config()
        cfg.model.random_init = preset
        assert cfg.problems(check_files=False) == [], preset
    cfg = Config()
    cfg.parallel.hardware, cfg.parallel.use_gpu, cfg.train.eval_max_batches = "tpu", "yes", 0
    cfg.data.chunk_mb, cfg.model.seed = "big", 1.5
    assert sorted(cfg.problems(check_files=False)) == sorted([
        f"parallel.hardware: 'tpu' is not one of {['auto', *builtin_names()]}",
        "parallel.use_gpu: 'yes' must be true or false",
        "train.eval_max_batches: 0 must be a whole number >= 1, or null for the whole validation set",
        "data.chunk_mb: expected a number, got 'big'",
        "model.seed: expected a whole number, got 1.5",
    ])
