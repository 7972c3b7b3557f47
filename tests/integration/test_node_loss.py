"""Node loss and return on a multi-node local cluster (lost workers and nodes, elastic runs: README,
"Fault tolerance and elasticity").

This module starts its own `ray.cluster_utils.Cluster`: a 1-CPU head (driver, Ray Train
controller, progress board, and a CPU for Ray Data tasks, e.g. rebuilding dataset blocks that
were stored on a lost node) and two 2-CPU worker nodes. A training worker asks for 1.5 CPUs,
so each worker node holds exactly one and the head none. An elastic run (1..2 workers) loses
a worker node mid-step, goes on with one worker from the last committed checkpoint, and grows
back to two workers when a node is added again. It finishes at its target step, with every
step's loss equal to an uninterrupted run's."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray

from raytune_llama.trainer.llama_trainer import LlamaTrainer
from tests.integration.multinode import LOCAL, local_cluster
from tests.integration.tiny_run import tiny_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEPS, EVERY = 48, 2  # enough steps for the one-worker phase to outlast adding a node
WORKER_NODE_CPUS = 2


def _cfg(tmp, name, *extra):
    return tiny_run_config(tmp, name, STEPS, "data.id_column=id", "parallel.cpus_per_worker=1.5", *extra)


@pytest.fixture(scope="module")
def node_cluster():
    """A 1-CPU head and two 2-CPU worker nodes (tests/integration/multinode.py). A restart sized
    from a node view that still lists the lost node waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    for resources that are gone before it is sized again (Ray's default: 60 s)."""
    with local_cluster(2, WORKER_NODE_CPUS, "rtn", {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"}) as cluster:
        yield cluster


def _refresh_node_view() -> None:
    """Ray Train's elastic policy sizes worker groups from the nodes that Ray Data's
    AutoscalingCoordinator knows, which it re-reads only every 20 s; have it re-read now."""
    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(coordinator.get_reserved_resources.remote("raytune-llama-test", recompute=True))


def _wait(what: str, predicate, run, timeout_s: float = 900) -> None:
    """Poll until predicate() holds; fail if the run ends first, or if it hangs (the deadline is a
    hang guard, far above what a loaded machine takes: how soon it holds is not checked)."""
    deadline = time.time() + timeout_s
    while not predicate():
        if run.done():
            run.result()  # raises the run's own error, if any
            raise AssertionError(f"the run ended before {what}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _committed_step(run_dir) -> int:
    """Step of the newest checkpoint Ray Train has committed (the one a restart resumes from),
    from the checkpoint-manager snapshot it rewrites at every commit; 0 before the first."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return (snapshot.get("latest_checkpoint_result") or {}).get("metrics", {}).get("step", 0)
    except (OSError, ValueError):
        return 0


def _world_sizes(run_dir) -> list:
    """World sizes so far, from the run report the driver rewrites at every checkpoint."""
    try:
        return json.loads((run_dir / "summary.json").read_text())["world_size_history"]
    except (OSError, ValueError, KeyError):
        return []


def test_node_lost_mid_step_and_added_back(node_cluster, tmp_path):
    # Uninterrupted reference, one worker; checkpoints do not change the numerics.
    straight = LlamaTrainer(_cfg(tmp_path, "straight", "parallel.num_workers=1",
                                 "checkpoint.every_steps=0", f"train.log_every={STEPS}")).fit()
    # max_failures=1: the node loss is the one failure allowed; a start that times out on the
    # stale node view and the resize back to 2 must not be charged to it.
    trainer = LlamaTrainer(_cfg(tmp_path, "elastic", "parallel.min_workers=1", "run.max_failures=1",
                                f"checkpoint.every_steps={EVERY}", f"train.log_every={EVERY}",
                                "parallel.resize_check_s=1"))
    run_dir = trainer.config.run_dir
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(trainer.fit)
        _wait("a committed checkpoint", lambda: _committed_step(run_dir) >= EVERY, run)
        victim = next(iter(node_cluster.worker_nodes))  # every worker node holds one training worker
        node_cluster.remove_node(victim)
        _wait("the node to be marked dead",
              lambda: not any(n["NodeID"] == victim.node_id and n["Alive"] for n in ray.nodes()), run)
        committed_at_loss = _committed_step(run_dir)  # nothing more commits without that node
        _refresh_node_view()
        _wait("a checkpoint on one worker", lambda: _world_sizes(run_dir)[-1:] == [1], run)
        node_cluster.add_node(num_cpus=WORKER_NODE_CPUS, node_ip_address=LOCAL)
        _refresh_node_view()
        summary = run.result(timeout=1800)  # a hang guard only
    assert summary["final_step"] == STEPS and summary["steps"] == list(range(1, STEPS + 1)), summary
    # One restart after a failure (the node loss, 2 -> 1) and one grow (1 -> 2: Ray Train
    # restarts the group at the larger size from the latest checkpoint; not a failure).
    assert summary["world_size_history"] == [2, 1, 2] and summary["restarts"] == 1 and summary["grows"] == 1, summary
    assert summary["start_causes"] == ["first", "restart", "grow"] and summary["failures"], summary
    assert summary["layout_history"][1] != summary["layout_history"][0]  # re-planned for 1 worker
    # The run went on from the newest complete checkpoint on storage: the one Ray Train had
    # committed when the node died, or a newer one it had not registered yet (Ray commits
    # reported checkpoints asynchronously; the worker looks at storage itself).
    assert summary["resumed_at_steps"][1] >= committed_at_loss >= EVERY, summary
    assert summary["resumed_at_steps"][2] > summary["resumed_at_steps"][1]  # the grow resumed from a 1-worker checkpoint
    # At most one interval per start, two when a start interrupts a checkpoint's upload.
    assert summary["steps_redone"] <= 2 * EVERY * (summary["restarts"] + summary["grows"]), summary
    # The global batch is the same at 1 and 2 workers: identical losses, and every document
    # trained on once, in the uninterrupted run's order (exactly-once data).
    np.testing.assert_allclose(summary["losses"], straight["losses"], rtol=1e-5)
    assert summary["tokens_seen"] == straight["tokens_seen"]
    audit = summary["data_audit"]
    assert audit["duplicated"] == [] and audit["problems"] == [], audit
    assert audit["ids"] == straight["data_audit"]["ids"] and audit["documents"] > 0
