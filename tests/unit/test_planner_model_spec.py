"""ModelSpec: registry, parameter counts against the published models, config loading, errors."""
import json

import pytest

from raytune_llama.planner.errors import PlanError
from raytune_llama.planner.model_spec import from_hf_config, load_model, registry_names

PUBLISHED = {  # HF-reported parameter counts
    "llama2-7b": 6.738e9, "llama2-13b": 13.016e9, "llama2-70b": 68.977e9, "llama3-8b": 8.030e9,
    "llama3-70b": 70.554e9, "llama3.1-405b": 405.853e9, "mistral-7b": 7.242e9,
    "qwen2.5-7b": 7.616e9, "qwen2.5-72b": 72.706e9,
}


def test_registry_has_all_models():
    assert set(PUBLISHED) | {"tiny-llama"} <= set(registry_names())


@pytest.mark.parametrize("name,count", sorted(PUBLISHED.items()))
def test_param_counts_match_published(name, count):
    assert load_model(name).n_params == pytest.approx(count, rel=2e-3)


def test_tiny_llama_shape():
    m = load_model("tiny-llama")
    assert (m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads) == (512, 64, 172, 4, 4, 2)
    assert not m.tie_word_embeddings and m.max_position_embeddings == 2048


def test_qwen_has_qkv_bias_and_flops_per_token():
    assert load_model("qwen2.5-7b").qkv_bias
    assert load_model("llama3-8b").model_flops_per_token(1024) == pytest.approx(4.7e10, rel=0.02)
    assert load_model("llama3-70b").model_flops_per_token(1024) == pytest.approx(4.25e11, rel=0.02)


def test_load_from_dict_path_and_dir(tmp_path):
    cfg = json.loads((load_model.__globals__["REGISTRY_DIR"] / "llama3-8b.json").read_text())
    assert from_hf_config(cfg).n_params == load_model("llama3-8b").n_params
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path).n_params == load_model(tmp_path / "config.json").n_params == load_model(cfg).n_params
    tied = dict(cfg, tie_word_embeddings=True)
    assert load_model(tied).n_params == load_model(cfg).n_params - cfg["vocab_size"] * cfg["hidden_size"]


def test_unknown_model_error_names_field_and_fix():
    with pytest.raises(PlanError) as exc:
        load_model("llama9-1t")
    assert "model='llama9-1t'" in str(exc.value) and "llama3-70b" in str(exc.value)
    with pytest.raises(PlanError, match="lacks field"):
        load_model({"hidden_size": 8})
