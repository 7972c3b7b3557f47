"""Hardware profiles and cluster sources (explicit, Ray launcher YAML, live Ray resources)."""
from pathlib import Path

import pytest
import yaml

from raytune_llama.planner.cluster import as_cluster, from_ray_launcher_yaml, from_ray_resources
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
