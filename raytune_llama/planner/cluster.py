"""ClusterSpec: nodes x devices per node of one hardware kind, given directly, read from a Ray
cluster launcher YAML (cluster/mi250.yaml) or from a live cluster's resource dict.

Convention for launcher YAMLs: each GPU node type declares `GPU: <devices per node>` and one
custom resource `"accelerator_type:<Ray accelerator name>": 1` (e.g. AMD-Instinct-MI250X-MI250)
naming the kind. The planner never imports ray: callers pass `ray.cluster_resources()` or
`ray.nodes()` output in.

Where a run's workers land: `worker_slots` reads how many training workers each node of a
`ray.nodes()` list can hold, `pack_placement` places the workers as Ray's PACK placement group
does (the node with the most free slots first, filled as far as it goes, then the next), and
`placed_topology` turns workers-per-node into the homogeneous nodes x devices_per_node the
planner plans on. Ray Train numbers ranks node by node, so with g = gcd(workers per node) every
node boundary falls on a multiple of g: planning on (world / g) nodes x g devices keeps every
tensor-parallel group (tp divides devices_per_node; tp is the innermost mesh axis, see
docs/parallel_engine.md) inside one node. `topology_of_ranks` reads the same from the node of
every rank once the workers run.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from raytune_llama.planner.errors import PlanError
from raytune_llama.planner.hardware import HardwareSpec, load_hardware

# Ray accelerator type strings (ray.util.accelerators) and common spellings -> profile names.
_ACCEL_ALIASES = [
    (r"mi250x?-mi250$|^mi250$", "mi250"),
    (r"mi250x", "mi250x"),
    (r"mi300x", "mi300x"),
    (r"h200", "h200"),
    (r"h100", "h100"),
    (r"a100", "a100-80gb"),
    (r"^cpu$", "cpu"),
]


def hardware_from_accelerator_type(accel: str) -> str:
    """Map a Ray accelerator type (e.g. 'AMD-Instinct-MI250X-MI250', 'H100') to a profile name."""
    key = accel.strip().lower().replace("amd-instinct-", "").replace("nvidia-", "")
    for pattern, name in _ACCEL_ALIASES:
        if re.search(pattern, key):
            return name
    raise PlanError("accelerator_type", accel, "unknown accelerator kind",
                    "pass --hardware explicitly or add a profile YAML for it")


@dataclass(frozen=True)
class ClusterSpec:
    """A homogeneous cluster: nodes x devices_per_node devices of one HardwareSpec."""

    nodes: int
    devices_per_node: int
    hardware: HardwareSpec

    @property
    def world_size(self) -> int:
        """Total devices."""
        return self.nodes * self.devices_per_node

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict summary."""
        return {"nodes": self.nodes, "devices_per_node": self.devices_per_node,
                "world_size": self.world_size, "hardware": self.hardware.name}


def make_cluster(hardware: "str | HardwareSpec", nodes: int = 1, devices_per_node: int | None = None,
                 profile: "str | os.PathLike | Mapping[str, Any] | None" = None) -> ClusterSpec:
    """Build and validate a ClusterSpec; devices_per_node defaults to the profile's node size."""
    hw = load_hardware(hardware, profile)
    dpn = hw.devices_per_node if devices_per_node is None else devices_per_node
    for field, value in (("nodes", nodes), ("devices_per_node", dpn)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlanError(field, value, "must be a positive integer", f"pass --{field.replace('_', '-')} N with N >= 1")
    return ClusterSpec(nodes=nodes, devices_per_node=dpn, hardware=hw)


def as_cluster(cluster: "ClusterSpec | Mapping[str, Any] | None" = None, **kwargs: Any) -> ClusterSpec:
    """Accept a ClusterSpec, a dict of make_cluster kwargs, or the kwargs themselves."""
    if isinstance(cluster, ClusterSpec):
        return cluster
    params = dict(cluster or {})
    params.update(kwargs)
    if "hardware" not in params:
        raise PlanError("cluster.hardware", None, "no hardware kind given", "pass hardware='mi250' (or another profile)")
    allowed = {"hardware", "nodes", "devices_per_node", "profile"}
    bad = sorted(set(params) - allowed)
    if bad:
        raise PlanError("cluster", bad, "unknown cluster field(s)", f"use {sorted(allowed)}")
    return make_cluster(**params)


def from_ray_launcher_yaml(path: "str | os.PathLike", profile: Any = None) -> ClusterSpec:
    """Read nodes, devices per node and the hardware kind from a Ray cluster launcher YAML."""
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PlanError("cluster", str(path), f"cannot read ({exc})", "pass a Ray cluster launcher YAML") from exc
    types = (cfg or {}).get("available_node_types") or {}
    if not types:
        raise PlanError("cluster", str(path), "no available_node_types", "declare node types with GPU resources")
    head_type = cfg.get("head_node_type")
    provider = cfg.get("provider") or {}
    gpu_types = {}
    for tname, tcfg in types.items():
        res = (tcfg or {}).get("resources") or {}
        gpus = int(res.get("GPU", 0))
        accel = [k.split(":", 1)[1] for k in res if str(k).startswith("accelerator_type:")]
        if gpus > 0:
            gpu_types[tname] = (gpus, accel[0] if accel else None, tcfg)
    if not gpu_types:
        raise PlanError("cluster", str(path), "no node type declares GPU resources",
                        "add resources: {GPU: 8, 'accelerator_type:AMD-Instinct-MI250X-MI250': 1}")
    dpns = {g for g, _, _ in gpu_types.values()}
    accels = {a for _, a, _ in gpu_types.values() if a}
    if len(dpns) > 1 or len(accels) > 1:
        raise PlanError("cluster", str(path), "heterogeneous GPU node types", "plan one node kind at a time")
    if not accels:
        raise PlanError("cluster", str(path), "GPU node types name no accelerator_type:<kind> resource",
                        "add e.g. 'accelerator_type:AMD-Instinct-MI250X-MI250': 1 to resources")
    nodes = 0
    if provider.get("type") == "local":
        worker_types = [t for t in gpu_types if t != head_type]
        # On-prem: the head (if it has GPUs) plus every listed worker IP are GPU nodes.
        nodes = (1 if head_type in gpu_types else 0) + (len(provider.get("worker_ips") or []) if worker_types or head_type in gpu_types else 0)
    else:
        for tname, (_, _, tcfg) in gpu_types.items():
            count = int(tcfg.get("max_workers", tcfg.get("min_workers", 0)) or 0)
            nodes += count + (1 if tname == head_type else 0)
    if nodes < 1:
        raise PlanError("cluster", str(path), "no GPU nodes found", "list worker_ips or set max_workers")
    return make_cluster(hardware_from_accelerator_type(accels.pop()), nodes, dpns.pop(), profile)


def from_ray_resources(resources: "Mapping[str, Any] | Sequence[Mapping[str, Any]]", profile: Any = None) -> ClusterSpec:
    """Build a ClusterSpec from ray.cluster_resources() (a dict) or ray.nodes() (a list of dicts)."""
    if isinstance(resources, Mapping):
        node_keys = [k for k in resources if k.startswith("node:") and not k.startswith("node:__")]
        accel = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
        gpus = int(resources.get("GPU", 0))
        nodes_with_gpu = int(sum(resources[f"accelerator_type:{a}"] for a in accel)) if accel else len(node_keys)
        if not accel or gpus < 1 or nodes_with_gpu < 1:
            raise PlanError("cluster_resources", {k: resources[k] for k in list(resources)[:6]},
                            "no GPU / accelerator_type resource", "start Ray nodes with --num-gpus and an accelerator type")
        if gpus % nodes_with_gpu:
            raise PlanError("cluster_resources", gpus, f"GPUs not evenly spread over {nodes_with_gpu} nodes",
                            "plan a homogeneous subset")
        return make_cluster(hardware_from_accelerator_type(accel[0]), nodes_with_gpu, gpus // nodes_with_gpu, profile)
    alive = [n for n in resources if n.get("Alive", n.get("alive", True))]
    per_node = []
    kinds = set()
    for node in alive:
        res = node.get("Resources") or node.get("resources") or {}
        g = int(res.get("GPU", 0))
        if g > 0:
            per_node.append(g)
            kinds.update(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))
    if not per_node or len(set(per_node)) > 1 or len(kinds) != 1:
        raise PlanError("ray_nodes", f"{len(alive)} alive nodes", "need >= 1 GPU node, same GPU count and one accelerator type",
                        "plan a homogeneous subset")
    return make_cluster(hardware_from_accelerator_type(kinds.pop()), len(per_node), per_node[0], profile)


def _node_resources(node: Mapping[str, Any]) -> Mapping[str, Any]:
    return node.get("Resources") or node.get("resources") or {}


def _alive(nodes: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [n for n in nodes if n.get("Alive", n.get("alive", True))]


def worker_slots(nodes: Sequence[Mapping[str, Any]], use_gpu: bool, cpus_per_worker: float) -> list[int]:
    """Training workers each alive node of a ray.nodes() list can hold: with use_gpu its GPUs
    (at most CPUs / cpus_per_worker), else floor(CPUs / cpus_per_worker)."""
    if not cpus_per_worker > 0:
        raise PlanError("parallel.cpus_per_worker", cpus_per_worker, "must be > 0", "set it to e.g. 1")
    slots = []
    for node in _alive(nodes):
        res = _node_resources(node)
        by_cpu = math.floor(float(res.get("CPU", 0)) / cpus_per_worker + 1e-9)
        slots.append(min(int(res.get("GPU", 0)), by_cpu) if use_gpu else by_cpu)
    return slots


def hardware_from_ray_nodes(nodes: Sequence[Mapping[str, Any]]) -> str:
    """Profile name of the accelerator_type:<kind> that the GPU nodes of a ray.nodes() list declare."""
    kinds = set()
    for node in _alive(nodes):
        res = _node_resources(node)
        if float(res.get("GPU", 0)) > 0:
            kinds.update(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))
    if len(kinds) != 1:
        raise PlanError("ray_nodes", sorted(kinds), "need GPU nodes of exactly one accelerator_type",
                        "start GPU nodes with an accelerator type (Ray detects it, or --resources "
                        "'{\"accelerator_type:AMD-Instinct-MI250X-MI250\": 1}'), one kind per run")
    return hardware_from_accelerator_type(kinds.pop())


def pack_placement(slots: Sequence[int], num_workers: int) -> list[int]:
    """Workers per node (nodes that get none left out) as Ray's PACK placement group places
    num_workers one-worker bundles: the node with the most free slots first, filled as far as
    it goes, then the next. Workers beyond the free slots are assumed to arrive on nodes of
    the largest size seen (an autoscaler adding nodes of that kind), or one per node."""
    if num_workers < 1:
        raise PlanError("num_workers", num_workers, "must be a positive integer", "use num_workers >= 1")
    left, counts = num_workers, []
    for free in sorted((s for s in slots if s > 0), reverse=True):
        take = min(free, left)
        counts.append(take)
        left -= take
        if not left:
            return counts
    size = max([s for s in slots if s > 0] or [1])
    while left:
        counts.append(min(size, left))
        left -= counts[-1]
    return counts


def placed_topology(counts: Sequence[int]) -> tuple[int, int]:
    """(nodes, devices_per_node) to plan on for workers placed counts[i] per node, each node's
    ranks consecutive: devices_per_node = gcd(counts), nodes = sum(counts) / devices_per_node."""
    if not counts or any(c < 1 for c in counts):
        raise PlanError("workers_per_node", list(counts), "need >= 1 worker on every listed node",
                        "list only the nodes that hold workers")
    per_node = math.gcd(*counts)
    return sum(counts) // per_node, per_node


def topology_of_ranks(node_of_rank: Sequence[str]) -> tuple[int, int]:
    """(nodes, devices_per_node) from the node id of every rank, in rank order; a node whose
    ranks are not consecutive is a PlanError (no layout could keep its tp groups in a node)."""
    runs: list[list] = []
    for node in node_of_rank:
        if runs and runs[-1][0] == node:
            runs[-1][1] += 1
        else:
            runs.append([node, 1])
    seen = [node for node, _ in runs]
    split = sorted({node for node in seen if seen.count(node) > 1})
    if split:
        ranks = {node: [r for r, n in enumerate(node_of_rank) if n == node] for node in split}
        raise PlanError("worker placement", ranks, "the ranks of a node are not consecutive, so a "
                        "tensor-parallel or pipeline group could not be kept inside one node",
                        "start the run with Ray Train's default rank order (ranks grouped by node)")
    return placed_topology([count for _, count in runs])
