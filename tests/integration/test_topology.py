"""The run plans on the cluster it gets, and tensor parallelism stays inside a node.

This module starts its own `ray.cluster_utils.Cluster` on 127.0.0.1: a 1-CPU head (driver,
Ray Train controller, progress board, and the one CPU that Ray Data's tasks run on) and two
2-CPU worker nodes. Four 1-CPU training workers fill the two worker nodes and leave the head's
CPU to the data pipeline: Ray's PACK placement puts them on the nodes with the most free CPUs
first (2 of 2 free scores above the head's 1 of 1), so the head never holds a training worker,
and the driver plans on 2 node(s) x 2 workers, the placement `planner/cluster.py` predicts.

* A planner run uses exactly the layout (and predicted step time) that `raytune-llama plan
  --nodes 2 --devices-per-node 2 --hardware cpu` gives for the same model and workload.
* A run forced to tp=2 keeps every tensor-parallel group on one node: the workers' own record
  (RUN_DIR/placement.json: each rank's node id and tp group as the engine built them) shows it.
"""
import json

import numpy as np
import pytest

from raytune_llama.planner.api import plan
from raytune_llama.trainer.llama_trainer import LlamaTrainer
from tests.integration.multinode import local_cluster
from tests.integration.tiny_run import tiny_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEPS = 3
WORKER_NODE_CPUS = 2
WORKLOAD = {"seq_len": 64, "global_batch": 8}  # tiny_run_config's data.seq_len and global batch


def _cfg(tmp, name, *extra):
    return tiny_run_config(tmp, name, STEPS, "parallel.num_workers=4", "parallel.cpus_per_worker=1",
                           f"train.log_every={STEPS}", "checkpoint.every_steps=0", *extra)


@pytest.fixture(scope="module")
def two_nodes():
    """A 1-CPU head and two 2-CPU worker nodes (tests/integration/multinode.py)."""
    with local_cluster(2, WORKER_NODE_CPUS, "rtt") as cluster:
        yield cluster


def _placement(run_dir) -> dict:
    return json.loads((run_dir / "placement.json").read_text())


def _worker_node_ids(cluster) -> set:
    return {node.node_id for node in cluster.worker_nodes}


def test_planner_layout_is_the_cli_plan_for_two_nodes_of_two(two_nodes, tmp_path, capsys):
    trainer = LlamaTrainer(_cfg(tmp_path, "planned"))
    summary = trainer.fit()
    assert summary["final_step"] == STEPS and np.isfinite(summary["losses"]).all(), summary
    cli = plan(trainer.config.model.name_or_path, cluster={"hardware": "cpu", "nodes": 2, "devices_per_node": 2},
               workload=WORKLOAD)
    assert summary["layout"] == cli.plan.describe() and summary["layout_history"] == [cli.plan.describe()]
    # The prediction is the 2 x 2 one (one node of 4 CPU workers is predicted slower).
    assert summary["predicted_step_time_s"] == pytest.approx(cli.best.time.step_time)
    assert f"{cli.plan.describe()} on 2 node(s) x 2 cpu worker(s)" in capsys.readouterr().out
    placed = _placement(trainer.config.run_dir)
    assert placed["topology"] == {"hardware": "cpu", "nodes": 2, "devices_per_node": 2}, placed
    nodes = [r["node_id"] for r in placed["ranks"]]
    # Ranks 0-1 on one worker node, 2-3 on the other; the head holds none.
    assert nodes[0] == nodes[1] != nodes[2] == nodes[3] and set(nodes) == _worker_node_ids(two_nodes), placed


def test_tensor_parallel_groups_stay_inside_a_node(two_nodes, tmp_path):
    layout = "tp=2,dp_shard=2,zero_stage=3"
    trainer = LlamaTrainer(_cfg(tmp_path, "tp2", f'parallel.layout="{layout}"'))
    summary = trainer.fit()
    assert summary["final_step"] == STEPS and np.isfinite(summary["losses"]).all(), summary
    assert "tp=2" in summary["layout"] and "dp_shard=2" in summary["layout"], summary["layout"]
    placed = _placement(trainer.config.run_dir)
    assert placed["topology"]["nodes"] == 2 and placed["topology"]["devices_per_node"] == 2, placed
    node_of = {r["rank"]: r["node_id"] for r in placed["ranks"]}
    groups = {tuple(r["tp_group"]) for r in placed["ranks"]}
    assert sorted(groups) == [(0, 1), (2, 3)], placed  # two tp groups of 2, as the mesh built them
    for group in groups:
        assert len({node_of[rank] for rank in group}) == 1, f"tp group {group} spans nodes: {placed}"
    assert set(node_of.values()) == _worker_node_ids(two_nodes), placed
