"""Apply a ParallelPlan to a Hugging Face Llama-class causal LM (torch backend).

Fixed order, per stage module this rank holds (torchtitan's order, for the same reasons):
  1. cut the model into pipeline stages (pp == 1: one stage holding everything)
  2. tensor parallel   - must see plain nn.Linear modules, so before any wrapper
  3. recompute         - wraps whole (already TP-sharded) decoder layers
  4. data parallel     - FSDP2 / DDP last: it shards whatever parameters (plain or DTensor) it finds
With `lora` (LoraSettings), peft's LoRA layers are injected into each stage right after it is cut,
so that tensor and data parallel shard the frozen base and the adapters alike (docs/lora.md).
With `load_from` (a meta-device model and its safetensors folder) each stage is materialised
with only this rank's tensors and slices: after FSDP2 (which shards meta parameters, so only
the shards are ever allocated), or just before DDP (which broadcasts dp rank 0's parameters at
construction: only that rank reads the files); ParallelPlan.loads_sharded tells which.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from raytune_llama.planner.plan import ParallelPlan

from . import lora as lora_layers
from .data_parallel import apply_data_parallel
from .mesh import dp_mesh
from .model_stages import CausalLMStage, build_stage, stage_ids_for_rank
from .recompute import apply_recompute
from .sharded_load import materialize_and_load
from .tensor_parallel import apply_tensor_parallel

log = logging.getLogger(__name__)


@dataclass
class ParallelModel:
    """What `parallelize` produced on this rank."""

    modules: list[nn.Module]
    """Modules to run, one per stage held (wrapped by DDP/FSDP where applicable)."""
    stages: list[CausalLMStage]
    """The same stages unwrapped (DDP hides its module under `.module`)."""
    stage_ids: list[int]
    """Global pipeline stage index of each module."""
    num_stages: int
    """pp * virtual_stages."""


def parallelize(model: nn.Module, plan: ParallelPlan, mesh: DeviceMesh, *,
                layer_costs: Sequence[float] | None = None,
                mixed_precision: str | None = None, load_from: str | None = None,
                lora=None) -> ParallelModel:
    """Cut, shard and wrap `model` (an HF *ForCausalLM) for `plan` on this rank's part of `mesh`;
    with `load_from`, fill the meta-device model from that safetensors file or folder; with
    `lora` (LoraSettings), train peft LoRA adapters on the frozen base (docs/lora.md)."""
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
        else torch.device(mesh.device_type)
    num_stages = plan.pp * plan.virtual_stages
    pp_rank = mesh.get_local_rank("pp")
    stage_ids = stage_ids_for_rank(pp_rank, plan.pp, plan.virtual_stages)
    stages, modules = [], []
    adapters = None
    if lora is not None:
        # The model's dtype is the master dtype (sharded_load.meta_model): the adapters' dtype.
        adapter_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        frozen_dtype = lora_layers.base_dtype(adapter_dtype, mixed_precision)
        adapters = lora_layers.initial_adapters(model, lora, adapter_dtype)  # collective, whole model
    for sid in stage_ids:
        stage = build_stage(model, sid, num_stages, layer_costs)
        real = not any(p.is_meta for p in stage.parameters())
        if lora is not None:
            lora_layers.inject_adapters(stage, lora, frozen_dtype, adapter_dtype)
            if real:
                lora_layers.fill_adapters(stage, adapters, device)
        if real:
            stage.to(device)
        # 1. tensor (+ sequence) parallel
        if plan.tp > 1:
            apply_tensor_parallel(stage, mesh["tp"], plan.sequence_parallel)
            if lora is not None:
                lora_layers.freeze_base(stage)
        # 2. activation recompute
        apply_recompute(stage, plan.recompute)
        # 3. data parallel, with the weights read where the wrapper wants them (module doc)
        if load_from is not None and not plan.loads_sharded:
            # DDP broadcasts dp rank 0's parameters at construction: only that rank reads.
            materialize_and_load([stage], load_from, device, read_weights=dp_mesh(mesh).get_local_rank() == 0,
                                 adapters=adapters)
        modules.append(apply_data_parallel(stage, plan, mesh, mixed_precision))
        if load_from is not None and plan.loads_sharded:
            materialize_and_load([stage], load_from, device, adapters=adapters)
        stages.append(stage)
        log.info("stage %d/%d: layers %s%s%s", sid, num_stages, list(stage.model.layers.keys()),
                 " +embedding" if stage.is_first else "", " +norm+lm_head" if stage.is_last else "")
    return ParallelModel(modules=modules, stages=stages, stage_ids=stage_ids, num_stages=num_stages)
