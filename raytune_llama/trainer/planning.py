"""Planning of a run: the parallel layout (the planner's choice, or the user's
`parallel.layout` checked by the planner) on the cluster the run gets, and the performance
context reported with every step (model FLOPs per token for MFU; predicted step time and
memory of the layout run).

On the driver, before any worker starts (an impossible layout is a ConfigError, not a hang):
the accelerator, the nodes and the devices per node come from `ray.nodes()`. Each node holds
GPUs (use_gpu) or floor(CPUs / parallel.cpus_per_worker) workers; the workers are placed as
Ray's PACK placement group places them, and the homogeneous topology planned on is
gcd(workers per node) devices on sum / gcd nodes (planner/cluster.py). That is the cluster
`raytune-llama plan --nodes N --devices-per-node D` takes, so the run gets the plan the CLI
prints for it. On the workers, `plan_on_workers` reads where Ray Train actually put every rank
and, when that or the world size differs from what the driver planned for, re-plans the same
way on every rank."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from raytune_llama.config import Config, ConfigError
from raytune_llama.lora_settings import LoraSettings
from raytune_llama.planner.api import estimate, plan
from raytune_llama.planner.cluster import (
    hardware_from_ray_nodes,
    pack_placement,
    placed_topology,
    topology_of_ranks,
    worker_slots,
)
from raytune_llama.planner.errors import PlanError
from raytune_llama.planner.model_spec import ModelSpec, from_hf_config
from raytune_llama.planner.plan import ParallelPlan

log = logging.getLogger(__name__)


RayNodes = Sequence[Mapping[str, Any]]  # ray.nodes() output


@dataclass(frozen=True)
class Topology:
    """The cluster a layout is planned for: nodes x devices_per_node workers of one hardware profile."""

    hardware: str
    nodes: int
    devices_per_node: int

    def to_dict(self) -> dict:
        """The planner's `cluster` argument (planner.api.plan), also sent to the workers."""
        return {"hardware": self.hardware, "nodes": self.nodes, "devices_per_node": self.devices_per_node}

    def describe(self) -> str:
        """E.g. '2 node(s) x 2 cpu worker(s)'."""
        return f"{self.nodes} node(s) x {self.devices_per_node} {self.hardware} worker(s)"


@dataclass(frozen=True)
class RunPlan:
    """The layout to run, the cluster it was planned for, and what the planner predicts for it."""

    plan: ParallelPlan
    hardware: str
    model_flops_per_token: Optional[float]
    predicted_step_time_s: Optional[float]
    predicted_memory_bytes: Optional[int]
    source: str  # "planner" | "parallel.layout" | "parallel.layout: measured"
    cluster: Topology

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


def resolve_hardware(cfg: Config, ray_nodes: Optional[RayNodes] = None) -> str:
    """Planner profile of the workers' devices: parallel.hardware, else cpu without GPUs, else
    the accelerator type that the GPU nodes of `ray.nodes()` declare."""
    if cfg.parallel.hardware != "auto":
        return cfg.parallel.hardware
    if not cfg.parallel.use_gpu:
        return "cpu"
    try:
        return hardware_from_ray_nodes(ray_nodes or [])
    except PlanError as exc:
        raise ConfigError([f"parallel.hardware: 'auto' could not tell the accelerator from the Ray "
                           f"cluster ({exc}); set it to one of mi250, mi250x, mi300x, h100, h200, a100-80gb"]) from exc


def run_topology(cfg: Config, world: int, ray_nodes: Optional[RayNodes] = None,
                 hardware: Optional[str] = None) -> Topology:
    """Nodes x devices per node of `world` workers as Ray places them on `ray_nodes`; without
    cluster information, one node holding them all."""
    hardware = hardware or resolve_hardware(cfg, ray_nodes)
    if ray_nodes is None:
        return Topology(hardware, 1, world)
    p = cfg.parallel
    try:
        slots = worker_slots(ray_nodes, p.use_gpu, p.cpus_per_worker)
        nodes, per_node = placed_topology(pack_placement(slots, world))
    except PlanError as exc:
        raise ConfigError([f"parallel: cannot place {world} worker(s) on the Ray cluster: {exc}"]) from exc
    if sum(slots) < world:
        log.warning("the Ray cluster has room for %d of %d %s worker(s) now (slots per node: %s); planning "
                    "on %d node(s) x %d, as if the rest came on nodes like the largest one", sum(slots), world,
                    "GPU" if p.use_gpu else f"{p.cpus_per_worker:g}-CPU", slots, nodes, per_node)
    return Topology(hardware, nodes, per_node)


def compute_dtype(mixed_precision: str, accelerator: bool) -> str:
    """The dtype the engine computes in: parallel.mixed_precision, with auto = bf16 on
    accelerators and fp32 on CPU (the worker and the planner both ask here)."""
    return "bf16" if mixed_precision == "bf16" or (mixed_precision == "auto" and accelerator) else "fp32"


def run_workload(cfg: Config) -> dict:
    """The planner's workload for this run, with the precision the engine trains in: fp32
    masters and AdamW moments (optimizer "adamw"), or pure bf16 (parallel.master_weights: bf16,
    "adamw_bf16", torch backend only: DeepSpeed's bf16 mode always keeps fp32 masters); what
    trains (train.lora: LoRA adapters on a frozen base, torch backend only) and the attention
    mask (data.packing: documents restricts attention to each document with an explicit mask)."""
    p = cfg.parallel
    lora = lora_settings(cfg)
    workload = {"seq_len": cfg.data.seq_len, "global_batch": cfg.train.global_batch_size,
                "compute_dtype": compute_dtype(p.mixed_precision, p.use_gpu),
                "lora_rank": lora.r if lora else 0,
                "lora_targets": lora.target_modules if lora else None,
                "attention_mask": "documents" if cfg.data.packing == "documents" else "causal"}
    if p.master_weights == "bf16":
        workload.update(optimizer="adamw_bf16", compute_dtype="bf16", backend="torch")
    return workload


def lora_settings(cfg: Config) -> Optional[LoraSettings]:
    """train.lora checked (None without LoRA); a bad value is a ConfigError naming the key."""
    try:
        return LoraSettings.from_dict(cfg.train.lora)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from exc


def model_flops_per_token(spec: ModelSpec, cfg: Config) -> float:
    """Model FLOPs per trained token for the run's MFU, counted as the planner counts them
    (LoRA: 4N + 6 N_adapters + 12 L d s instead of 6N + 12 L d s; docs/planner.md)."""
    lora = lora_settings(cfg)
    if lora is None:
        return spec.model_flops_per_token(cfg.data.seq_len)
    return spec.model_flops_per_token(cfg.data.seq_len, lora.r, lora.target_modules)


def make_run_plan(cfg: Config, model_path: str, ray_nodes: Optional[RayNodes] = None, *,
                  topology: Optional[Topology] = None) -> RunPlan:
    """The layout to run on `topology` (default: run_topology of ray_nodes): parallel.layout
    checked by the planner, or the planner's best."""
    topology = topology or run_topology(cfg, cfg.parallel.num_workers, ray_nodes)
    hardware = topology.hardware
    spec = model_spec(model_path)
    cluster = topology.to_dict()
    workload = run_workload(cfg)
    layout = cfg.parallel.layout
    source = "parallel.layout"
    if isinstance(layout, str) and layout.strip() == MEASURED:
        layout, source = measured_layout(cfg, topology), "parallel.layout: measured"
    try:
        if layout:
            est = estimate(spec, cluster=cluster, workload=workload, layout=layout)
            if not est.feasible or est.plan is None:
                raise ConfigError([f"parallel.layout: {layout!r} cannot run on {topology.describe()}: "
                                   f"{'; '.join(est.reasons)}"])
            return RunPlan(est.plan, hardware, model_flops_per_token(spec, cfg),
                           est.time.step_time, int(est.memory.total), source, topology)
        result = plan(spec, cluster=cluster, workload=workload)
    except PlanError as exc:
        raise ConfigError([f"parallel: no layout for this run on {topology.describe()}: {exc}"]) from exc
    best = result.best
    return RunPlan(best.plan, hardware, model_flops_per_token(spec, cfg),
                   best.time.step_time, int(best.memory.total), "planner", topology)


MEASURED = "measured"


def measured_layout_path(cfg: Config) -> Path:
    """Where `raytune-llama tune-layout` stores the layout it measured fastest for this run:
    {run.storage_path}/{run.name}/tune_layout/measured_layout.json (docs/planner.md)."""
    return Path(cfg.run.storage_path) / cfg.run.name / "tune_layout" / "measured_layout.json"


def measured_layout(cfg: Config, topology: Topology) -> str:
    """The layout of `parallel.layout: measured`: the winner of the run's last tune-layout, as a
    layout string. A ConfigError naming `raytune-llama tune-layout` when none was measured yet,
    or when it was measured for another world size or workload (a changed placement of the same
    world size only warns: the planner still checks the layout on the cluster the run gets)."""
    path = measured_layout_path(cfg)
    fix = ("run `raytune-llama tune-layout CONFIG.yaml` (same run.name and run.storage_path) to measure the "
           "planner's best layouts on this cluster, or set parallel.layout to a layout or null")
    if not path.is_file():
        raise ConfigError([f"parallel.layout: 'measured' but no layout was measured for run {cfg.run.name!r} yet "
                           f"({path} does not exist); {fix}"])
    try:
        record = json.loads(path.read_text())
        layout = str(record["layout"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError([f"parallel.layout: 'measured' but {path} cannot be read ({exc}); {fix}"]) from exc
    world = cfg.parallel.num_workers
    wanted = {"world_size": world, "global_batch": cfg.train.global_batch_size, "seq_len": cfg.data.seq_len}
    wrong = [f"{key} {record.get(key)} (this run: {value})" for key, value in wanted.items()
             if record.get(key) is not None and record.get(key) != value]
    if wrong:
        raise ConfigError([f"parallel.layout: 'measured' ({record.get('describe', layout)}) was measured for "
                           f"{', '.join(wrong)}; {fix}"])
    measured_on = record.get("topology")
    if measured_on and measured_on != topology.to_dict():
        log.warning("parallel.layout: measured was measured on %s, this run gets %s; running it anyway",
                    Topology(**measured_on).describe(), topology.describe())
    return layout


def at_world_size(cfg: Config, world: int) -> Config:
    """cfg for `world` workers: a fixed parallel.layout only holds at its own size, so any
    other size is planned afresh."""
    import dataclasses

    if world == cfg.parallel.num_workers:
        return cfg
    parallel = dataclasses.replace(cfg.parallel, num_workers=world, layout=None)
    return dataclasses.replace(cfg, parallel=parallel)


def admissible_world_sizes(cfg: Config, model_path: str, ray_nodes: Optional[RayNodes] = None) -> dict[int, str]:
    """Elastic range: world size -> layout for every size in [min_workers, num_workers] at
    which the global batch is kept exactly, each planned on where Ray places that many workers
    on `ray_nodes`; sizes without one are left out."""
    low = cfg.parallel.min_workers or cfg.parallel.num_workers
    hardware = resolve_hardware(cfg, ray_nodes)  # a cluster problem is an error, not "no size"
    sizes = {}
    for world in range(low, cfg.parallel.num_workers + 1):
        topology = run_topology(cfg, world, ray_nodes, hardware)
        try:
            sizes[world] = make_run_plan(at_world_size(cfg, world), model_path, topology=topology).plan.describe()
        except ConfigError:
            continue
    return sizes


def elastic_world_sizes(cfg: Config, model_path: str, ray_nodes: Optional[RayNodes] = None) -> dict[int, str]:
    """admissible_world_sizes when it covers all of min_workers..num_workers (Ray Train may start
    or resize the run at any size in that range); a ConfigError naming the fix otherwise."""
    p, batch = cfg.parallel, cfg.train.global_batch_size
    low = p.min_workers or p.num_workers
    sizes = admissible_world_sizes(cfg, model_path, ray_nodes)
    missing = [w for w in range(low, p.num_workers + 1) if w not in sizes]
    if not missing:
        return sizes
    start = max(missing) + 1
    if start < p.num_workers:
        fix = f"set parallel.min_workers to {start} (a layout exists at every size {start}..{p.num_workers})"
    elif start == p.num_workers:
        fix = f"remove parallel.min_workers (a fixed run of {p.num_workers} workers has a layout)"
    else:
        fix = "choose a train.global_batch_size that a layout of num_workers workers can keep"
    raise ConfigError([
        f"parallel.min_workers: {low} lets Ray Train run at any size in {low}..{p.num_workers} workers, "
        f"but a layout keeping train.global_batch_size={batch} exists only at sizes {sorted(sizes)} "
        f"(none at {missing}); {fix}, or choose a global batch that every size in the range divides"])


@dataclass(frozen=True)
class Placement:
    """Where a worker group runs: the Ray node id of every rank, and the topology that gives."""

    node_of_rank: list
    topology: Topology


def worker_placement(hardware: str) -> Placement:
    """Every rank's node id, gathered on the initialised process group (collective), and the
    topology they give; ranks of one node that are not consecutive are an error."""
    import ray
    import torch.distributed as dist

    me = ray.get_runtime_context().get_node_id()
    nodes = [me]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        nodes = [None] * dist.get_world_size()
        dist.all_gather_object(nodes, me)
    try:
        count, per_node = topology_of_ranks(nodes)
    except PlanError as exc:
        raise RuntimeError(f"Ray Train placed this worker group's ranks in an unsupported order: {exc}") from exc
    return Placement(nodes, Topology(hardware, count, per_node))


def plan_on_workers(cfg: Config, loop_config: dict, world: int) -> tuple[ParallelPlan, Placement, Optional[RunPlan]]:
    """The layout of this worker group: the driver's, unless the world size (elastic resize) or
    the actual placement differs from what the driver planned for; then the one planned on the
    actual topology (the same on every rank). Returns (plan, placement, the new RunPlan or None)."""
    planned_plan = ParallelPlan.from_dict(loop_config["plan"])
    cluster = loop_config.get("cluster")
    planned = Topology(**cluster) if cluster else None
    hardware = planned.hardware if planned else resolve_hardware(cfg)
    placement = worker_placement(hardware)
    if planned_plan.world_size == world and placement.topology == planned:
        return planned_plan, placement, None
    run = make_run_plan(at_world_size(cfg, world), loop_config["model_path"], topology=placement.topology)
    if planned_plan.world_size != world:
        log.warning("re-planned for %d workers on %s: %s -> %s", world, placement.topology.describe(),
                    planned_plan.describe(), run.plan.describe())
    else:
        log.warning("the workers run on %s, not on the %s planned for: re-planned %s -> %s",
                    placement.topology.describe(), planned.describe() if planned else "cluster",
                    planned_plan.describe(), run.plan.describe())
    return run.plan, placement, run


def record_placement(run_dir: "str | os.PathLike", placement: Placement, plan_: ParallelPlan, engine: Any) -> None:
    """RUN_DIR/placement.json: each rank's node id and tensor-parallel group as the engine built
    them (collective; rank 0 writes it, at every worker-group start)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = getattr(engine, "mesh", None)
    mine = dist.get_process_group_ranks(mesh.get_group("tp")) if mesh is not None and plan_.tp > 1 else [rank]
    groups: list = [None] * world
    dist.all_gather_object(groups, sorted(mine))
    if rank != 0:
        return
    record = {"world_size": world, "layout": plan_.describe(), "topology": placement.topology.to_dict(),
              "ranks": [{"rank": r, "node_id": placement.node_of_rank[r], "tp_group": groups[r]}
                        for r in range(world)]}
    path = Path(run_dir) / "placement.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
