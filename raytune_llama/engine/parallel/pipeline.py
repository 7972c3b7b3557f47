"""Pipeline parallel with torch.distributed.pipelining: this rank's stage modules become
`PipelineStage`s and one schedule (GPipe, 1F1B or interleaved 1F1B with virtual stages)
runs all micro-batches of a step. The first stage takes (input_ids, position_ids) and every
stage hands (hidden, position_ids) to the next, so document packing's attention mask is built
on every stage from the same positions. The loss function given here already normalises by the
global token count, so the schedule must NOT rescale gradients by the micro-batch count."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from raytune_llama.planner.plan import ParallelPlan

log = logging.getLogger(__name__)

_SINGLE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def build_schedule(modules: list[nn.Module], stage_ids: list[int], plan: ParallelPlan, mesh: DeviceMesh,
                   device: torch.device, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Wrap this rank's stage modules in PipelineStages and return the plan's schedule."""
    num_stages = plan.pp * plan.virtual_stages
    group = mesh.get_group("pp")
    for m in modules:  # every micro-batch carries its position ids to every stage (model_stages.py)
        m.pass_positions = True
    stages = [PipelineStage(m, sid, num_stages, device, group=group) for m, sid in zip(modules, stage_ids)]
    if plan.pp_schedule == "interleaved_1f1b":
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=plan.grad_accum, loss_fn=loss_fn,
                                           scale_grads=False)
    elif plan.pp_schedule in _SINGLE:
        schedule = _SINGLE[plan.pp_schedule](stages[0], n_microbatches=plan.grad_accum, loss_fn=loss_fn,
                                             scale_grads=False)
    else:
        raise ValueError(f"pp_schedule must be one of gpipe|1f1b|interleaved_1f1b, got {plan.pp_schedule!r}")
    log.info("pipeline: %s pp=%d stages %s of %d, %d micro-batches", plan.pp_schedule, plan.pp,
             stage_ids, num_stages, plan.grad_accum)
    return schedule, stages
