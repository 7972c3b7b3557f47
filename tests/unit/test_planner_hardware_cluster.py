"""Hardware profiles and cluster sources (explicit, Ray launcher YAML, live Ray resources), and
where a run's workers land: worker slots per node, Ray's PACK placement, the topology planned on."""
from pathlib import Path

import pytest
import yaml

from raytune_llama.planner.cluster import (
    as_cluster,
    from_ray_launcher_yaml,
    from_ray_resources,
    hardware_from_ray_nodes,
    pack_placement,
    placed_topology,
    topology_of_ranks,
    worker_slots,
)
from raytune_llama.planner.errors import PlanError
from raytune_llama.planner.hardware import builtin_names, load_hardware

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["mi250", "mi250x", "mi300x", "h100", "h200", "a100-80gb", "cpu"])
def test_every_shipped_profile_loads(name):
    hw = load_hardware(name)
    assert hw.name == name and hw.peak_flops > 0 and hw.memory_bytes > 0
    assert name in builtin_names()


def test_mi250_is_one_gcd_with_fast_pair_link():
    hw = load_hardware("mi250")
    assert hw.peak_flops == pytest.approx(181e12) and hw.devices_per_card == 2
    assert hw.intra_card_bw > hw.intra_node_bw > hw.inter_node_bw
    assert load_hardware("h100").inter_node_bw >= 4 * hw.inter_node_bw


def test_profile_yaml_overrides_and_adds(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"name": "mi250", "memory_bytes": 32 * 2**30, "efficiency": {"matmul_max": 0.4}}))
    hw = load_hardware("mi250", f)
    assert hw.memory_bytes == 32 * 2**30 and hw.efficiency.matmul_max == 0.4 and hw.peak_flops == 181e12
    g = tmp_path / "new.yaml"
    g.write_text("name: mygpu\npeak_flops: 100e12\nmemory_bytes: 1.0e+10\nmemory_bw: 1.0e+12\n")
    assert load_hardware("mygpu", g).peak_flops == 100e12
    with pytest.raises(PlanError, match="unknown field"):
        load_hardware("mi250", {"name": "mi250", "flops": 1})
    with pytest.raises(PlanError, match="hardware='tpu'"):
        load_hardware("tpu")


def test_launcher_yaml_reads_back():
    c = from_ray_launcher_yaml(ROOT / "cluster" / "mi250.yaml")
    assert (c.nodes, c.devices_per_node, c.hardware.name, c.world_size) == (8, 8, "mi250", 64)


def test_live_ray_resources_dict_and_nodes_list():
    res = {"CPU": 256.0, "GPU": 16.0, "accelerator_type:H100": 2.0, "node:10.0.0.1": 1.0,
           "node:10.0.0.2": 1.0, "node:__internal_head__": 1.0, "memory": 1e12}
    c = from_ray_resources(res)
    assert (c.nodes, c.devices_per_node, c.hardware.name) == (2, 8, "h100")
    nodes = [{"Alive": True, "Resources": {"GPU": 8.0, "accelerator_type:AMD-Instinct-MI250X-MI250": 1.0}}] * 3
    nodes.append({"Alive": False, "Resources": {"GPU": 8.0}})
    c2 = from_ray_resources(nodes)
    assert (c2.nodes, c2.devices_per_node, c2.hardware.name) == (3, 8, "mi250")
    with pytest.raises(PlanError):
        from_ray_resources({"CPU": 4.0})


def test_cluster_kwargs_errors():
    assert as_cluster(hardware="h100", nodes=2).world_size == 16
    with pytest.raises(PlanError, match="nodes=0"):
        as_cluster(hardware="h100", nodes=0)


def _node(cpus, gpus=0, accel=None, alive=True):
    res = {"CPU": float(cpus), "memory": 1e11, "node:10.0.0.1": 1.0}
    if gpus:
        res["GPU"] = float(gpus)
    if accel:
        res[f"accelerator_type:{accel}"] = 1.0
    return {"NodeID": f"n{cpus}-{gpus}", "Alive": alive, "Resources": res}


def test_worker_slots_from_ray_nodes():
    cpu_nodes = [_node(1), _node(2), _node(2), _node(7, alive=False)]
    assert worker_slots(cpu_nodes, use_gpu=False, cpus_per_worker=1) == [1, 2, 2]  # the dead node is out
    assert worker_slots(cpu_nodes, use_gpu=False, cpus_per_worker=1.5) == [0, 1, 1]
    mi250 = "AMD-Instinct-MI250X-MI250"
    gpu_nodes = [_node(16)] + [_node(128, 8, mi250)] * 2 + [_node(32, 8, mi250)]
    # GPUs per node, capped by CPUs / cpus_per_worker (a 32-CPU node holds 4 workers of 8 CPUs)
    assert worker_slots(gpu_nodes, use_gpu=True, cpus_per_worker=8) == [0, 8, 8, 4]
    assert hardware_from_ray_nodes(gpu_nodes) == "mi250"
    with pytest.raises(PlanError, match="accelerator_type"):
        hardware_from_ray_nodes(cpu_nodes)
    with pytest.raises(PlanError, match="accelerator_type"):
        hardware_from_ray_nodes([_node(64, 8, mi250), _node(64, 8, "H100")])
    with pytest.raises(PlanError, match="cpus_per_worker"):
        worker_slots(cpu_nodes, use_gpu=False, cpus_per_worker=0)


@pytest.mark.parametrize("slots, workers, counts, topology", [
    ([8] * 8, 64, [8] * 8, (8, 8)),              # full GPU nodes
    ([0] + [8] * 8, 64, [8] * 8, (8, 8)),        # a head without GPUs holds none
    ([1, 2, 2], 4, [2, 2], (2, 2)),              # CPU head with one slot: the 2-slot nodes fill first
    ([8] * 4, 16, [8, 8], (2, 8)),               # PACK fills two nodes, the others stay free
    ([8, 8, 8, 4], 28, [8, 8, 8, 4], (7, 4)),    # heterogeneous: gcd 4 keeps node boundaries aligned
    ([3, 3], 4, [3, 1], (4, 1)),                 # uneven fill: only tp=1 stays inside a node
    ([4, 2, 6], 8, [6, 2], (4, 2)),              # the largest node first
    ([8, 8], 24, [8, 8, 8], (3, 8)),             # short of room: the rest on nodes like the largest
    ([0, 0], 3, [1, 1, 1], (3, 1)),              # no room at all: one per node
])
def test_pack_placement_and_topology(slots, workers, counts, topology):
    assert pack_placement(slots, workers) == counts
    assert placed_topology(counts) == topology


def test_topology_keeps_every_tp_group_inside_a_node():
    # tp innermost in the mesh: tp group k is ranks [k*tp, (k+1)*tp); with consecutive ranks per
    # node and tp dividing devices_per_node = gcd(counts), no group spans a node boundary.
    for counts in ([8, 8, 8, 4], [6, 2], [2, 2], [3, 1], [4, 4, 2, 6]):
        nodes, per_node = placed_topology(counts)
        node_of_rank = [i for i, c in enumerate(counts) for _ in range(c)]
        assert topology_of_ranks(node_of_rank) == (nodes, per_node)
        for tp in (t for t in range(1, per_node + 1) if per_node % t == 0):
            groups = [node_of_rank[k:k + tp] for k in range(0, len(node_of_rank), tp)]
            assert all(len(set(g)) == 1 for g in groups), (counts, tp)


def test_topology_of_ranks():
    assert topology_of_ranks(["a", "a", "b", "b"]) == (2, 2)
    assert topology_of_ranks(["a", "a", "a", "b"]) == (4, 1)
    assert topology_of_ranks(["a"] * 4) == (1, 4)
    with pytest.raises(PlanError, match="not consecutive") as err:
        topology_of_ranks(["a", "b", "a", "b"])
    assert "'a': [0, 2]" in str(err.value)
    with pytest.raises(PlanError, match="workers_per_node"):
        placed_topology([])
