"""Process group + DeviceMesh for a ParallelPlan, and the data-parallel coordinates that the
data loader shards by. Mesh axes, outermost first: dp_replicate, dp_shard, pp, tp (tensor
parallel innermost so its heavy per-layer collectives stay on the fastest links)."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from raytune_llama.planner.plan import ParallelPlan

MESH_AXES = ("dp_replicate", "dp_shard", "pp", "tp")


def default_device_type() -> str:
    """'cuda' when an accelerator is visible (ROCm builds also report 'cuda'), else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(device_type: str | None = None, timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed from env (RANK/WORLD_SIZE/MASTER_*): nccl on cuda, gloo on cpu."""
    if dist.is_initialized():
        return
    device_type = device_type or default_device_type()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def mesh_shape(plan: ParallelPlan) -> tuple[int, int, int, int]:
    """Sizes for MESH_AXES. With zero_stage 0 nothing is sharded, so every dp rank is a replica."""
    if plan.zero_stage == 0:
        return (plan.dp, 1, plan.pp, plan.tp)
    return (plan.dp_replicate, plan.dp_shard, plan.pp, plan.tp)


def build_mesh(plan: ParallelPlan, device_type: str | None = None) -> DeviceMesh:
    """A 4-axis DeviceMesh (dp_replicate, dp_shard, pp, tp) over the initialised world."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call init_distributed() first")
    world = dist.get_world_size()
    if plan.world_size != world:
        raise ValueError(
            f"plan world size (dp_replicate*dp_shard*tp*pp = {plan.world_size}) must equal the "
            f"number of processes ({world})"
        )
    return init_device_mesh(device_type or default_device_type(), mesh_shape(plan), mesh_dim_names=MESH_AXES)


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel axes flattened into one 1-D 'dp' mesh (cached by DeviceMesh)."""
    return mesh["dp_replicate", "dp_shard"]._flatten("dp")


def data_parallel_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    """(dp rank, dp size) of this process: slice the global batch by these; tp/pp peers share rows."""
    dmesh = dp_mesh(mesh)
    return dmesh.get_local_rank(), dmesh.size()

