"""Driver-side planning: the parallel layout of a run (the planner's choice, or the user's
`parallel.layout` checked by the planner) and the performance context reported with every
step (model FLOPs per token for MFU; predicted step time and memory of the layout run).

Runs before any worker starts, so an impossible layout is a ConfigError, not a hang."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from raytune_llama.config import Config, ConfigError
from raytune_llama.planner.api import estimate, plan
from raytune_llama.planner.errors import PlanError
from raytune_llama.planner.model_spec import ModelSpec, from_hf_config
from raytune_llama.planner.plan import ParallelPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """The layout to run and what the planner predicts for it."""

    plan: ParallelPlan
    hardware: str
    model_flops_per_token: Optional[float]
    predicted_step_time_s: Optional[float]
    predicted_memory_bytes: Optional[int]
    source: str  # "planner" | "parallel.layout"

    def performance(self) -> dict:
        """What the workers report next to their measurements."""
        return {
            "layout": self.plan.describe(), "model_flops_per_token": self.model_flops_per_token,
            "predicted_step_time_s": self.predicted_step_time_s,
            "predicted_memory_bytes": self.predicted_memory_bytes,
        }


def model_spec(model_path: str) -> ModelSpec:
    """ModelSpec from the model directory's config.json."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return from_hf_config(config, name=Path(model_path).name)


def resolve_hardware(cfg: Config, cluster_resources: Optional[dict] = None) -> str:
    """Planner profile of the workers' devices: parallel.hardware, else cpu without GPUs, else
    the accelerator type Ray reports for the cluster."""
    if cfg.parallel.hardware != "auto":
        return cfg.parallel.hardware
    if not cfg.parallel.use_gpu:
        return "cpu"
    from raytune_llama.planner.cluster import from_ray_resources

    try:
        return from_ray_resources(cluster_resources or {}).hardware.name
    except PlanError as exc:
        raise ConfigError([f"parallel.hardware: 'auto' could not tell the accelerator from the Ray "
                           f"cluster ({exc}); set it to one of mi250, mi250x, mi300x, h100, h200, a100-80gb"]) from exc


def _cluster(cfg: Config, hardware: str) -> dict:
    # One node holding every worker: on a single host (CPU tests, one GPU box) tensor
    # parallel is then allowed across all workers.
    return {"hardware": hardware, "nodes": 1, "devices_per_node": cfg.parallel.num_workers}


def make_run_plan(cfg: Config, model_path: str, cluster_resources: Optional[dict] = None) -> RunPlan:
    """The layout to run: parallel.layout checked by the planner, or the planner's best."""
    hardware = resolve_hardware(cfg, cluster_resources)
    spec = model_spec(model_path)
    cluster = _cluster(cfg, hardware)
    workload = {"seq_len": cfg.data.seq_len, "global_batch": cfg.train.global_batch_size}
    layout = cfg.parallel.layout
    try:
        if layout:
            est = estimate(spec, cluster=cluster, workload=workload, layout=layout)
            if not est.feasible or est.plan is None:
                raise ConfigError([f"parallel.layout: {layout!r} cannot run on {cfg.parallel.num_workers} "
                                   f"{hardware} worker(s): {'; '.join(est.reasons)}"])
            return RunPlan(est.plan, hardware, spec.model_flops_per_token(cfg.data.seq_len),
                           est.time.step_time, int(est.memory.total), "parallel.layout")
        result = plan(spec, cluster=cluster, workload=workload)
    except PlanError as exc:
        raise ConfigError([f"parallel: no layout for this run: {exc}"]) from exc
    best = result.best
    return RunPlan(best.plan, hardware, spec.model_flops_per_token(cfg.data.seq_len),
                   best.time.step_time, int(best.memory.total), "planner")


def at_world_size(cfg: Config, world: int) -> Config:
    """cfg for `world` workers: a fixed parallel.layout only holds at its own size, so any
    other size is planned afresh."""
    import dataclasses

    if world == cfg.parallel.num_workers:
        return cfg
    parallel = dataclasses.replace(cfg.parallel, num_workers=world, layout=None)
    return dataclasses.replace(cfg, parallel=parallel)


def admissible_world_sizes(cfg: Config, model_path: str) -> dict[int, str]:
    """Elastic range: world size -> layout for every size in [min_workers, num_workers] at
    which the global batch is kept exactly; sizes without one are left out."""
    low = cfg.parallel.min_workers or cfg.parallel.num_workers
    sizes = {}
    for world in range(low, cfg.parallel.num_workers + 1):
        try:
            sizes[world] = make_run_plan(at_world_size(cfg, world), model_path).plan.describe()
        except ConfigError:
            continue
    return sizes
