"""Run `LlamaTrainer(cfg).fit()` on the cluster from a Ray client session.

    import ray, raytune_llama
    from raytune_llama.trainer.remote_fit import fit_remote
    ray.init("ray://HEAD:10001")                      # Ray client
    summary = fit_remote(raytune_llama.load_config("cfg.yaml", ["run.storage_path=/mnt/shared/runs"]))

Why a remote task: under Ray client (`ray://`) the driver code runs in the client process,
which has no Ray core worker of its own. `LlamaTrainer.fit()` prepares the data with Ray Data
on the driver, and Ray Data 2.60's streaming executor needs the driver's core worker: called
directly from a client, `fit()` fails in `Dataset.materialize()` with
`AttributeError: 'Worker' object has no attribute 'core_worker'` (Ray's own docs say Ray client
"may not work as expected" for Ray Train / Tune and point to Ray Jobs). `fit_remote` therefore
runs the whole driver side of `fit()` (model creation, planning, Ray Data, the Ray Train
controller, the summary) in one zero-CPU Ray task on the cluster and returns the summary dict
to the client; the task's progress lines reach the client through Ray's log streaming. The same
call also works from an ordinary driver (`ray.init(address=...)`).

Paths: the fit runs on a cluster node, so `model.name_or_path`, `data.path`,
`run.storage_path`, ... must be absolute paths that exist on the cluster (a shared mount) or
hub ids; relative paths are refused here because they would be resolved in the remote
worker's working directory, not yours.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from raytune_llama.config import Config, ConfigError
from raytune_llama.engine.hf_cache import looks_like_hub_id


def relative_paths(cfg: Config) -> list[str]:
    """Problems for every local path field of cfg that is not absolute."""
    fields = [
        ("model.name_or_path", cfg.model.name_or_path, True),
        ("model.tokenizer", cfg.model.tokenizer, True),
        ("data.path", cfg.data.path, cfg.data.file_reader != "hf"),
        ("data.eval_path", cfg.data.eval_path, cfg.data.file_reader != "hf"),
        ("run.storage_path", cfg.run.storage_path, True),
        ("run.export_dir", cfg.run.export_dir, True),
    ]
    problems = []
    for name, value, local in fields:
        if not local or value is None or looks_like_hub_id(value) or "://" in value:
            continue
        if not os.path.isabs(os.path.expanduser(value)):
            problems.append(
                f"{name}: {value!r} is relative; fit_remote runs on a cluster node, so give an "
                f"absolute path every node sees (e.g. /mnt/shared/...)"
            )
    return problems


def _fit_on_cluster(cfg: Config) -> dict:
    """Body of the remote task: an ordinary driver-side fit (files checked here, on the node)."""
    from raytune_llama.trainer.llama_trainer import LlamaTrainer

    return LlamaTrainer(cfg).fit()


def fit_remote(cfg: Config, address: Optional[str] = None) -> dict:
    """Validate cfg here, run `LlamaTrainer(cfg).fit()` in a Ray task on the cluster and
    return its summary. Connects to `address` (or cfg.run.address / RAY_ADDRESS; a ray://
    address starts a Ray client session) when Ray is not initialised yet; raises ConfigError for an invalid config or relative paths (the
    files themselves are checked on the cluster, where the client may not see them)."""
    import ray

    cfg = cfg.validate(check_files=False)
    problems = relative_paths(cfg)
    if problems:
        raise ConfigError(problems)
    if not ray.is_initialized():
        address = address or cfg.run.address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise ConfigError([
                "run.address: fit_remote needs a running cluster; call ray.init('ray://HEAD:10001') "
                "first, pass address=..., or use LlamaTrainer(cfg).fit() for a local run"
            ])
        ray.init(address=address)
    # The task is the run's driver: it must not take a CPU from the training workers or the
    # data tasks (a job's driver does not either). run.address is dropped: the task is
    # already connected to the cluster it runs on.
    remote_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, address=None))
    task = ray.remote(num_cpus=0, max_retries=0)(_fit_on_cluster)
    ref = task.remote(remote_cfg)
    try:
        return ray.get(ref)
    except KeyboardInterrupt:
        ray.cancel(ref)
        raise
