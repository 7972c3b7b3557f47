"""Connect to a Ray cluster, or start a local one sized so the data pipeline always has
CPUs left next to the training workers (on a 2-core machine Ray Data otherwise waits forever
for a CPU that the training workers hold)."""
from __future__ import annotations

import logging
import math
import os
import socket
from typing import Optional

log = logging.getLogger(__name__)

LOCAL_TEMP_DIR = "/tmp/raytune_llama"
# The controller polls workers this often; Ray's 2 s default makes every report ~2 s long.
FAST_HEALTH_CHECK_S = "0.2"


def local_num_cpus(num_workers: int, cpus_per_worker: float, requested: Optional[int]) -> int:
    """Logical CPUs for a local cluster: the workers' share plus 2 for data tasks, at least 4."""
    if requested:
        return requested
    return max(4, math.ceil(num_workers * cpus_per_worker) + 2)


def connect(address: Optional[str], num_cpus: int, with_dashboard: bool = True) -> bool:
    """Initialise Ray; returns True when this call started a local cluster (caller shuts it down).
    with_dashboard: a local cluster also runs the dashboard (on 127.0.0.1), whose state API Ray
    Train's placement-group cleaner (started by every run) queries each second: to free the
    workers of a run whose driver was killed (a Tune trial stopped early: `raytune-llama sweep`),
    and, without it, failing and printing "Failed to query Ray Train Controller actor state"
    for the whole run."""
    import ray

    from raytune_llama import console

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", FAST_HEALTH_CHECK_S)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        # Quiet (console.py): Ray's connection banner goes to the driver log, not the console.
        ray.init(address=address, log_to_driver=True, configure_logging=console.is_verbose())
        console.remember_ray_log_dir()
        return False
    log.info("starting a local Ray cluster with %d logical CPUs", num_cpus)
    # A local cluster is this one machine: no node of it is ever preempted or drained, so Ray
    # Train's preemption watcher has nothing to watch, and creating it makes the controller log
    # a core_worker error at every worker-group start ("Actor with class name: 'PreemptionWatcher'
    # ... has constructor arguments in the object store and max_restarts > 0":
    # ray-project/ray#53727). The cluster's processes inherit this environment.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    dashboard = {}
    if with_dashboard:
        # The cleaner finds the state API through RAY_API_SERVER_ADDRESS; unset, it looks for
        # "the" local Ray instance and dies ("Found multiple active Ray instances") when another
        # one runs on this machine. So the dashboard gets a port chosen here, which the
        # cluster's processes inherit with this environment.
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        dashboard = {"dashboard_port": port}
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=with_dashboard,
        dashboard_host="127.0.0.1",
        _temp_dir=LOCAL_TEMP_DIR,
        log_to_driver=True,
        configure_logging=False,
        **dashboard,
    )
    console.remember_ray_log_dir()
    return True


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
