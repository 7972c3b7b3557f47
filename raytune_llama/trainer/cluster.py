"""Connect to a Ray cluster, or start a local one sized so the data pipeline always has
CPUs left next to the training workers (on a 2-core machine Ray Data otherwise waits forever
for a CPU that the training workers hold)."""
from __future__ import annotations

import logging
import math
import os
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


def connect(address: Optional[str], num_cpus: int, with_dashboard: bool = False) -> bool:
    """Initialise Ray; returns True when this call started a local cluster (caller shuts it down).
    with_dashboard: a local cluster also runs the dashboard (on 127.0.0.1), whose state API Ray
    Train's placement-group cleaner needs to free the workers of a run whose driver was killed
    (a Tune trial stopped early: `raytune-llama sweep`)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", FAST_HEALTH_CHECK_S)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return False
    log.info("starting a local Ray cluster with %d logical CPUs", num_cpus)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=with_dashboard,
        dashboard_host="127.0.0.1",
        _temp_dir=LOCAL_TEMP_DIR,
        log_to_driver=True,
        configure_logging=False,
    )
    return True
