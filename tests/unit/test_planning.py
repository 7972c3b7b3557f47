"""Driver-side planning of a run: the planner's layout, a user layout checked before any
worker starts, and clear errors naming parallel.layout; the cluster planned on (nodes x devices
per node from `ray.nodes()`-shaped lists, as the CLI's --nodes/--devices-per-node) and the
elastic range refused on the driver when a size in it has no layout."""
import json

import pytest

from raytune_llama.config import ConfigError, load_config
from raytune_llama.planner.api import plan
from raytune_llama.presets import preset_hf_config
from raytune_llama.trainer.planning import Topology, elastic_world_sizes, make_run_plan
from tests.unit.test_config import REPO, TINY

MI250 = "AMD-Instinct-MI250X-MI250"


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


def test_pure_bf16_weights_on_a_deepspeed_layout_fail_on_the_driver_with_the_engines_rule(model_dir):
    from raytune_llama.engine.parallel.plan_check import check_plan

    cfg = _cfg("parallel.layout=dp_shard=2,zero_stage=2,backend=deepspeed", "parallel.master_weights=bf16",
               "train.global_batch_size=16")
    with pytest.raises(ConfigError) as err:
        make_run_plan(cfg, model_dir)
    rule = ("parallel.master_weights: 'bf16' needs backend 'torch' (DeepSpeed's bf16 mode always keeps fp32 master "
            "weights); use master_weights: fp32, or a torch layout")
    assert rule in str(err.value)
    with pytest.raises(ValueError) as engine_err:  # the engine refuses it with the same sentence
        check_plan(make_run_plan(_cfg("parallel.layout=dp_shard=2,zero_stage=2,backend=deepspeed",
                                      "train.global_batch_size=16"), model_dir).plan, master_weights="bf16")
    assert str(engine_err.value) == rule
    assert make_run_plan(_cfg("parallel.master_weights=bf16", "train.global_batch_size=16"),
                         model_dir).plan.backend == "torch"  # the planner picks a torch layout itself


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


def _node(cpus, gpus=0, accel=None):
    """One entry of ray.nodes()."""
    res = {"CPU": float(cpus), "memory": 1e11, "object_store_memory": 1e10, "node:127.0.0.1": 1.0}
    if gpus:
        res.update({"GPU": float(gpus), f"accelerator_type:{accel}": 1.0})
    return {"NodeID": f"{cpus}-{gpus}", "Alive": True, "Resources": res}


def test_cpu_run_plans_on_the_nodes_ray_gives_it(model_dir):
    # A 1-CPU head and two 2-CPU nodes; 4 one-CPU workers fill the two nodes (Ray's PACK).
    nodes = [_node(1), _node(2), _node(2)]
    cfg = _cfg("parallel.num_workers=4", "train.global_batch_size=8", "data.seq_len=64")
    run = make_run_plan(cfg, model_dir, nodes)
    assert run.cluster == Topology("cpu", 2, 2) and run.cluster.describe() == "2 node(s) x 2 cpu worker(s)"
    # exactly what `raytune-llama plan --nodes 2 --devices-per-node 2 --hardware cpu` chooses
    cli = plan(model_dir, cluster={"hardware": "cpu", "nodes": 2, "devices_per_node": 2},
               workload={"seq_len": 64, "global_batch": 8})
    assert run.plan == cli.plan and run.predicted_step_time_s == pytest.approx(cli.best.time.step_time)
    # without cluster information: one node holding every worker, as before
    assert make_run_plan(cfg, model_dir).cluster == Topology("cpu", 1, 4)


def test_user_layout_must_keep_tp_inside_a_node(model_dir):
    tp2 = ('parallel.layout="tp=2,dp_shard=2,zero_stage=3"', "parallel.num_workers=4", "train.global_batch_size=8")
    assert make_run_plan(_cfg(*tp2), model_dir, [_node(1), _node(2), _node(2)]).plan.tp == 2
    # Two 3-CPU nodes: PACK puts 3 workers on one and 1 on the other, so no tp=2 group stays in a node.
    with pytest.raises(ConfigError) as err:
        make_run_plan(_cfg(*tp2), model_dir, [_node(3), _node(3)])
    assert "parallel.layout" in str(err.value) and "4 node(s) x 1 cpu" in str(err.value)
    assert "cross nodes" in str(err.value)


@pytest.mark.parametrize("hardware", ["mi250", "auto"])
def test_shipped_70b_config_plans_on_8_nodes_of_8(tmp_path, hardware):
    (tmp_path / "config.json").write_text(json.dumps(preset_hf_config("llama3-70b")))
    cfg = load_config(REPO / "examples" / "configs" / "llama3_70b_mi250.yaml", [f"parallel.hardware={hardware}"])
    nodes = [_node(16)] + [_node(128, 8, MI250) for _ in range(8)]  # a CPU-only head and 8 GPU nodes
    run = make_run_plan(cfg, str(tmp_path), nodes)
    assert run.cluster == Topology("mi250", 8, 8)
    cli = plan("llama3-70b", cluster={"hardware": "mi250", "nodes": 8, "devices_per_node": 8},
               workload={"seq_len": 1024, "global_batch": 512})
    assert run.plan == cli.plan and run.plan.tp <= 8
    # the old single-node assumption (64 devices in one node) chose another layout
    old = make_run_plan(cfg, str(tmp_path), topology=Topology("mi250", 1, 64))
    assert run.plan.describe() != old.plan.describe()


def test_elastic_range_with_a_gap_is_refused_on_the_driver(model_dir):
    # 12 sequences: no layout of the 4-layer, 4-head tiny model at 5 or 7 workers.
    cfg = _cfg("parallel.num_workers=9", "parallel.min_workers=1", "train.global_batch_size=12")
    with pytest.raises(ConfigError) as err:
        elastic_world_sizes(cfg, model_dir)
    msg = str(err.value)
    assert "parallel.min_workers: 1" in msg and "[1, 2, 3, 4, 6, 8, 9]" in msg and "[5, 7]" in msg
    assert "set parallel.min_workers to 8" in msg
    top = _cfg("parallel.num_workers=6", "parallel.min_workers=2", "train.global_batch_size=12")
    with pytest.raises(ConfigError, match="remove parallel.min_workers"):
        elastic_world_sizes(top, model_dir)
    ok = _cfg("parallel.num_workers=9", "parallel.min_workers=8", "train.global_batch_size=12")
    assert sorted(elastic_world_sizes(ok, model_dir)) == [8, 9]


def test_elastic_gpu_run_with_hardware_auto_reads_the_cluster(model_dir):
    cfg = _cfg("parallel.num_workers=4", "parallel.min_workers=2", "train.global_batch_size=8",
               "parallel.use_gpu=true", "parallel.hardware=auto")
    nodes = [_node(8), _node(64, 2, "H100"), _node(64, 2, "H100")]
    sizes = elastic_world_sizes(cfg, model_dir, nodes)
    assert sorted(sizes) == [2, 3, 4]
    # No cluster information: the error names parallel.hardware, not the global batch.
    with pytest.raises(ConfigError, match="parallel.hardware: 'auto'"):
        elastic_world_sizes(cfg, model_dir)


def _placed(monkeypatch, nodes, per_node, node_of_rank=None):
    """Stand in for the workers' gather of every rank's node id."""
    from raytune_llama.trainer import planning

    placement = planning.Placement(node_of_rank or [], Topology("cpu", nodes, per_node))
    monkeypatch.setattr(planning, "worker_placement", lambda hardware: placement)


def _loop_config(run, model_dir):
    return {"plan": run.plan.to_dict(), "cluster": run.cluster.to_dict(), "model_path": model_dir}


def test_workers_keep_the_driver_plan_where_it_was_planned_for(model_dir, monkeypatch):
    from raytune_llama.trainer.planning import plan_on_workers

    cfg = _cfg("parallel.num_workers=4", "train.global_batch_size=8", "data.seq_len=64")
    run = make_run_plan(cfg, model_dir, [_node(1), _node(2), _node(2)])
    _placed(monkeypatch, 2, 2)
    plan_, placement, replanned = plan_on_workers(cfg, _loop_config(run, model_dir), 4)
    assert plan_ == run.plan and replanned is None and placement.topology == run.cluster


def test_workers_replan_on_the_actual_placement(model_dir, monkeypatch, caplog):
    from raytune_llama.trainer.planning import plan_on_workers

    cfg = _cfg("parallel.num_workers=4", "train.global_batch_size=8", "data.seq_len=64")
    run = make_run_plan(cfg, model_dir, [_node(1), _node(2), _node(2)])
    _placed(monkeypatch, 4, 1)  # Ray put the workers 3 + 1: only tp=1 stays in a node
    with caplog.at_level("WARNING"):
        plan_, _, replanned = plan_on_workers(cfg, _loop_config(run, model_dir), 4)
    assert replanned.cluster == Topology("cpu", 4, 1)
    assert plan_ == make_run_plan(cfg, model_dir, topology=Topology("cpu", 4, 1)).plan
    assert "4 node(s) x 1 cpu" in caplog.text and "2 node(s) x 2 cpu" in caplog.text
    # Elastic resize to 2 workers on one node: planned for that size and that node.
    _placed(monkeypatch, 1, 2)
    plan_, _, replanned = plan_on_workers(cfg, _loop_config(run, model_dir), 2)
    assert plan_.world_size == 2 and plan_.global_batch() == 8 and replanned.cluster == Topology("cpu", 1, 2)
    # A fixed tp=2 layout cannot run where no two ranks share a node: a clear error on the workers.
    tp2 = _cfg('parallel.layout="tp=2,dp_shard=2,zero_stage=3"', "parallel.num_workers=4", "train.global_batch_size=8")
    run = make_run_plan(tp2, model_dir, [_node(1), _node(2), _node(2)])
    _placed(monkeypatch, 4, 1)
    with pytest.raises(ConfigError, match="parallel.layout.*4 node\\(s\\) x 1 cpu.*cross nodes"):
        plan_on_workers(tp2, _loop_config(run, model_dir), 4)
