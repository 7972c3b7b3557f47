"""DeepSpeed ZeRO-1/2/3 (optional CPU optimizer offload) behind the ParallelEngine interface.

Data parallel only (tp == pp == 1): every process is a dp rank. The engine hands DeepSpeed a
torch AdamW (no FusedAdam / CPUAdam C++ build; `zero_force_ds_cpu_optimizer: false` allows it
under offload) and keeps its own loss normalisation: DeepSpeed divides each micro-batch loss
by gradient_accumulation_steps and averages gradients over dp ranks, so the engine multiplies
its globally-normalised loss by ga * dp before `backward` to cancel both.
Note: ZeRO-3 with parameter offload as well aborted at process exit on CPU; only optimizer
offload is exposed (plan.offload).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from raytune_llama.planner.plan import ParallelPlan

from .model_stages import build_stage
from .sharded_load import load_flat_partitions, materialize_and_load, reinit_rotary

log = logging.getLogger(__name__)


def deepspeed_config(plan: ParallelPlan, max_grad_norm: float | None, mixed_precision: str | None) -> dict:
    """The DeepSpeed JSON config equivalent of `plan`."""
    zero: dict = {"stage": plan.zero_stage}
    if plan.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.micro_batch_size * plan.grad_accum * plan.dp,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _init_distributed() -> None:
    import deepspeed

    from raytune_llama.console import library_prints_to_log

    # DeepSpeed's CPU backend print()s "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built
    # successfully" in every process as it creates its communication backend: log, not console.
    with library_prints_to_log():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def build_stage_for_deepspeed(model: nn.Module, plan: ParallelPlan, load_from: str | None, device: torch.device,
                              max_grad_norm: float | None, mixed_precision: str | None) -> nn.Module:
    """The one stage DeepSpeed trains. With `load_from` (a meta-device `model` and its
    safetensors), no rank holds the whole model in host memory: ZeRO-3 builds it inside
    `deepspeed.zero.Init` (each parameter partitioned as it is created) and each rank reads
    only the rows covering its own partitions; ZeRO-1/2 keep a whole replica on the device,
    which is allocated there directly and filled one tensor at a time on rank 0 (DeepSpeed
    broadcasts it to the others)."""
    if load_from is None:
        return build_stage(model, 0, 1).to(device)
    import torch.distributed as dist

    if not plan.loads_sharded:  # ZeRO-1/2
        # deepspeed.initialize broadcasts rank 0's parameters to every replica: only it reads.
        stage = build_stage(model, 0, 1)
        materialize_and_load([stage], load_from, device, read_weights=dist.get_rank() == 0)
        return stage
    import deepspeed

    _init_distributed()
    config = deepspeed_config(plan, max_grad_norm, mixed_precision)
    # zero.Init takes the module dtype from the config (bf16 under DeepSpeed's bf16 mode, whose
    # optimizer then keeps fp32 masters); HF's weight init runs on empty partitions (no-op).
    with deepspeed.zero.Init(config_dict_or_path=config):
        full = type(model)(model.config)
    stage = build_stage(full, 0, 1)
    # zero.Init casts float tensors made inside it (arange included) to the module dtype:
    # rebuild the rotary frequencies outside it, in fp32, as every other path does.
    reinit_rotary(stage, device)
    parts = [(name, tuple(p.ds_shape), dist.get_rank(group=p.ds_process_group) * p.ds_tensor.ds_numel,
              p.ds_tensor.data) for name, p in stage.named_parameters()]
    load_flat_partitions(parts, load_from)
    return stage


def build_deepspeed_engine(module: nn.Module, optimizer: torch.optim.Optimizer, plan: ParallelPlan,
                           max_grad_norm: float | None, mixed_precision: str | None):
    """deepspeed.initialize on an existing torch.distributed world; returns the DeepSpeedEngine."""
    import deepspeed

    _init_distributed()
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer,
        config=deepspeed_config(plan, max_grad_norm, mixed_precision),
    )
    log.info("deepspeed: ZeRO-%d over dp=%d%s", plan.zero_stage, plan.dp, " + CPU optimizer offload" if plan.offload else "")
    return engine


def load_model_state_dict(engine, state: dict[str, torch.Tensor]) -> None:
    """Load full module weights on every rank and refresh DeepSpeed's fp32 master copies."""
    import deepspeed

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            module.load_state_dict(state, strict=True)
    else:
        module.load_state_dict(state, strict=True)
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()
