"""Driver-side planning of a run: the planner's layout, a user layout checked before any
worker starts, and clear errors naming parallel.layout."""
import json

import pytest

from raytune_llama.config import ConfigError, load_config
from raytune_llama.presets import preset_hf_config
from raytune_llama.trainer.planning import make_run_plan
from tests.unit.test_config import TINY


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset_hf_config("tiny-llama")))
    return str(tmp_path)


def _cfg(*overrides):
    return load_config(TINY, list(overrides))


def test_planner_layout_fits_the_workers(model_dir):
    run = make_run_plan(_cfg("parallel.num_workers=2", "train.global_batch_size=16"), model_dir)
    assert run.source == "planner" and run.hardware == "cpu"
    assert run.plan.world_size == 2 and run.plan.global_batch() == 16
    assert run.model_flops_per_token > 0 and run.predicted_step_time_s > 0


@pytest.mark.parametrize("layout", ["dp_shard=2,zero_stage=3", "tp=2", "pp=2,micro_batch_size=2",
                                    "dp_shard=2,zero_stage=1,backend=deepspeed"])
def test_user_layout_is_completed_and_kept(model_dir, layout):
    run = make_run_plan(_cfg(f"parallel.layout={layout}", "train.global_batch_size=16"), model_dir)
    assert run.source == "parallel.layout" and run.plan.world_size == 2 and run.plan.global_batch() == 16


@pytest.mark.parametrize("layout, words", [
    ("tp=3", "parallel.layout"),             # tp does not divide the heads, nor the world size
    ("pp=8", "parallel.layout"),             # more stages than layers / workers
    ("dp_replicate=2,micro_batch_size=3", "global batch"),
])
def test_impossible_layouts_fail_on_the_driver(model_dir, layout, words):
    with pytest.raises(ConfigError) as err:
        make_run_plan(_cfg(f"parallel.layout={layout}", "train.global_batch_size=16"), model_dir)
    assert words in str(err.value) and layout in str(err.value)


def test_elastic_sizes_keep_the_global_batch(model_dir):
    from raytune_llama.trainer.planning import admissible_world_sizes, at_world_size

    cfg = _cfg("parallel.num_workers=4", "parallel.min_workers=1", "train.global_batch_size=12",
               'parallel.layout="dp_shard=4,zero_stage=3,micro_batch_size=3"')
    sizes = admissible_world_sizes(cfg, model_dir)
    assert sorted(sizes) == [1, 2, 3, 4]  # 12 sequences split evenly at each size
    for world in sizes:
        assert make_run_plan(at_world_size(cfg, world), model_dir).plan.global_batch() == 12
    odd = _cfg("parallel.num_workers=3", "parallel.min_workers=2", "train.global_batch_size=8")
    three = make_run_plan(at_world_size(odd, 3), model_dir).plan
    # 8 sequences cannot be split over 3 data-parallel ranks: at 3 workers the planner keeps the
    # batch with a pipeline (or another non-dp axis) instead.
    assert three.dp in (1, 2, 4, 8) and three.global_batch() == 8 and three.world_size == 3
    assert sorted(admissible_world_sizes(odd, model_dir)) == [2, 3]
