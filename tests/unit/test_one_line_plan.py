"""Which plan the one line applies: an explicit one, the driver's when it is for the loop's
batch, else one made for the loop's own global batch and sequence length."""
import json

import pytest
from transformers import LlamaConfig

from raytune_llama.engine.one_line import PLAN_ENV, enable_advanced_parallelization, resolve_plan
from raytune_llama.planner.plan import ParallelPlan

CONFIG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def test_the_driver_plan_is_used_only_for_its_own_global_batch(monkeypatch):
    driver = ParallelPlan(dp_replicate=1, micro_batch_size=2, grad_accum=4)
    monkeypatch.setenv(PLAN_ENV, json.dumps(driver.to_dict()))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_plan(CONFIG).to_dict() == driver.to_dict()
    assert resolve_plan(CONFIG, global_batch=8).to_dict() == driver.to_dict()
    own = resolve_plan(CONFIG, global_batch=12, seq_len=128)
    assert own.global_batch() == 12  # planned here for the loop's DataLoader


def test_bad_batch_options_are_refused_before_anything_is_built():
    with pytest.raises(ValueError, match=r"global_batch_size: 0 must be a whole number >= 1"):
        enable_advanced_parallelization(global_batch_size=0)
    with pytest.raises(TypeError, match="loss_fn: 3 is not callable"):
        enable_advanced_parallelization(loss_fn=3)


def test_a_resized_worker_group_replans_for_its_size_keeping_the_global_batch(monkeypatch):
    driver = ParallelPlan(dp_replicate=4, micro_batch_size=1, grad_accum=2)  # planned for 4 workers
    monkeypatch.setenv(PLAN_ENV, json.dumps(driver.to_dict()))
    monkeypatch.setenv("WORLD_SIZE", "1")  # the group came back with 1
    plan = resolve_plan(CONFIG)
    assert plan.world_size == 1 and plan.global_batch() == driver.global_batch() == 8
