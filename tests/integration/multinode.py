"""A multi-node Ray cluster in one process for a test module: `ray.cluster_utils.Cluster` with a
1-CPU head and worker nodes, everything on 127.0.0.1, sessions in a temp dir of its own; the
driver is connected to it while the `with` block runs and reconnected afterwards to the cluster
it was connected to before (the session head, when an earlier module used it), whose token-auth
settings in os.environ then apply to these nodes as well."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from unittest import mock

import ray

from tests.integration.conftest import free_port

LOCAL = "127.0.0.1"


@contextlib.contextmanager
def local_cluster(worker_nodes: int, worker_node_cpus: int, prefix: str, env: dict | None = None):
    """Yield a started Cluster (1-CPU head + `worker_nodes` nodes of `worker_node_cpus` CPUs),
    with `env` set in os.environ while it lives."""
    from ray.cluster_utils import Cluster

    previous = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    ray.shutdown()
    # Sessions and the "current cluster" address file in a temp dir of our own, so that
    # `ray.init(address="auto")` elsewhere on the machine never finds this cluster.
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    env = {"RAY_TMPDIR": temp_dir, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": LOCAL, "include_dashboard": False,
            "dashboard_agent_listen_port": free_port()})
        for _ in range(worker_nodes):
            cluster.add_node(num_cpus=worker_node_cpus, node_ip_address=LOCAL)
        cluster.wait_for_nodes()
        # The nodes listen on 127.0.0.1 only, but ray.init turns a loopback address into this
        # host's outward IP (right for `ray start` heads, which listen on every interface).
        with mock.patch.object(ray._private.services, "resolve_ip_for_localhost", lambda host: host):
            ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(temp_dir, ignore_errors=True)
        if previous:
            ray.init(address=previous, log_to_driver=False)
