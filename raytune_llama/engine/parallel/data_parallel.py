"""Data parallel for the torch backend: classic DDP, FSDP2-style replicate, or FSDP2 sharding.

Plan -> wrapper (ZeRO stage over the dp_shard axis, replicas over dp_replicate = HSDP):
* zero 0, tp == pp == 1 : torch DDP over the flattened dp axis (bucketed all-reduce, overlapped).
* zero 0, tp or pp > 1  : FSDP2 `replicate` (DDP semantics; understands DTensor TP params and
                          pipelining's micro-batch hooks; classic DDP under a pipeline stage
                          failed its bucket rebuild on the first step).
* zero 1/2        : `fully_shard(reshard_after_forward=False)`: params stay gathered between
                    forward and backward; grads reduce-scattered (ZeRO-2). For ZeRO-1 the
                    engine also defers the gradient sync to the last micro-batch, so gradients
                    accumulate unsharded like in ZeRO-1.
* zero 3          : `fully_shard(reshard_after_forward=True)`: params re-gathered for backward.
Each decoder layer is its own FSDP unit (one all-gather per layer), the stage is the root.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from raytune_llama.planner.plan import ParallelPlan

from .mesh import dp_mesh

log = logging.getLogger(__name__)

def mixed_precision_policy(mixed_precision: str | None) -> MixedPrecisionPolicy:
    """Compute in bf16, keep the master weights' dtype, reduce gradients in fp32."""
    if mixed_precision is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_data_parallel(stage: nn.Module, plan: ParallelPlan, mesh: DeviceMesh,
                        mixed_precision: str | None = None) -> nn.Module:
    """Wrap one stage module for data parallelism (plan.data_parallel_wrapper); returns the
    module to call."""
    wrapper = plan.data_parallel_wrapper
    if wrapper == "none":
        log.info("data parallel: none (dp=1)")
        return stage
    mp = mixed_precision_policy(mixed_precision)
    if wrapper == "ddp":
        group = dp_mesh(mesh).get_group()
        device = mesh.device_type
        ids = [torch.cuda.current_device()] if device == "cuda" else None
        log.info("data parallel: DDP over dp=%d", plan.dp)
        return DistributedDataParallel(stage, process_group=group, device_ids=ids)
    if wrapper == "fsdp_replicate":
        from torch.distributed._composable.replicate_with_fsdp import replicate

        m = dp_mesh(mesh)
        for layer in stage.model.layers.values():
            replicate(layer, mesh=m, mp_policy=mp)
        replicate(stage, mesh=m, mp_policy=mp)
        log.info("data parallel: FSDP2 replicate over dp=%d (tp=%d, pp=%d)", plan.dp, plan.tp, plan.pp)
        return stage
    assert wrapper == "fsdp_shard", wrapper
    # HSDP when there are replicas: a 2-D (replicate, shard) mesh; else 1-D over dp_shard.
    shard_mesh = mesh["dp_replicate", "dp_shard"] if plan.dp_replicate > 1 else mesh["dp_shard"]
    reshard = plan.zero_stage == 3
    for layer in stage.model.layers.values():
        fully_shard(layer, mesh=shard_mesh, reshard_after_forward=reshard, mp_policy=mp)
    # The root keeps embedding / norm / lm_head; it is not resharded after forward because
    # backward needs it first anyway.
    fully_shard(stage, mesh=shard_mesh, reshard_after_forward=False, mp_policy=mp)
    log.info("data parallel: FSDP2 zero=%d over dp_shard=%d%s (reshard_after_forward=%s)",
             plan.zero_stage, plan.dp_shard,
             f" x dp_replicate={plan.dp_replicate} (HSDP)" if plan.dp_replicate > 1 else "", reshard)
    return stage
