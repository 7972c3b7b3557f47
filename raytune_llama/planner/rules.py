"""Hard rules every layout must satisfy; each violation is a sentence naming knob and values."""
from __future__ import annotations

from raytune_llama.planner.cluster import ClusterSpec
from raytune_llama.planner.model_spec import ModelSpec
from raytune_llama.planner.plan import BACKENDS, PP_SCHEDULES, RECOMPUTE_MODES, ParallelPlan
from raytune_llama.planner.workload import Workload

LORA_DEEPSPEED = ("backend=deepspeed cannot train LoRA adapters (train.lora): the engine refuses that "
                  "combination; use backend=torch")


def tp_violation(model: ModelSpec, cluster: ClusterSpec, tp: int) -> str | None:
    """Why this TP degree is illegal, or None (crossing nodes is reported first)."""
    if tp > cluster.devices_per_node or cluster.devices_per_node % tp:
        return f"tensor parallel degree ({tp}) would cross nodes (devices_per_node={cluster.devices_per_node})"
    if model.num_heads % tp or model.num_kv_heads % tp:
        return (f"tensor parallel degree ({tp}) must divide the number of attention heads "
                f"({model.num_heads}) and key/value heads ({model.num_kv_heads})")
    return None


def plan_violations(model: ModelSpec, cluster: ClusterSpec, workload: Workload, plan: ParallelPlan) -> list[str]:
    """All hard-rule violations of a layout (empty when the layout is legal)."""
    out = []
    for name in ("dp_replicate", "dp_shard", "tp", "pp", "virtual_stages", "micro_batch_size", "grad_accum"):
        if getattr(plan, name) < 1:
            out.append(f"{name} ({getattr(plan, name)}) must be >= 1")
    if out:
        return out
    if plan.world_size != cluster.world_size:
        out.append(f"dp_replicate*dp_shard*tp*pp ({plan.world_size}) must equal the world size ({cluster.world_size})")
    if plan.global_batch() != workload.global_batch:
        out.append(f"dp*micro_batch_size*grad_accum ({plan.global_batch()}) must equal the global batch "
                   f"({workload.global_batch})")
    tpv = tp_violation(model, cluster, plan.tp)
    if tpv:
        out.append(tpv)
    if plan.pp * plan.virtual_stages > model.num_layers:
        out.append(f"pp*virtual_stages ({plan.pp * plan.virtual_stages}) must be <= layers ({model.num_layers})")
    if plan.pp_schedule not in PP_SCHEDULES:
        out.append(f"pp_schedule ({plan.pp_schedule}) must be one of {PP_SCHEDULES}")
    if plan.virtual_stages > 1 and plan.pp_schedule != "interleaved_1f1b":
        out.append(f"virtual_stages ({plan.virtual_stages}) > 1 needs pp_schedule=interleaved_1f1b")
    if plan.pp_schedule == "interleaved_1f1b" and plan.pp > 1 and plan.grad_accum < plan.pp:
        out.append(f"interleaved 1F1B needs grad_accum ({plan.grad_accum}) >= pp ({plan.pp})")
    if plan.recompute not in RECOMPUTE_MODES:
        out.append(f"recompute ({plan.recompute}) must be one of {RECOMPUTE_MODES}")
    if plan.backend not in BACKENDS:
        out.append(f"backend ({plan.backend}) must be one of {BACKENDS}")
    if plan.zero_stage not in (0, 1, 2, 3):
        out.append(f"zero_stage ({plan.zero_stage}) must be 0..3")
    elif plan.zero_stage == 0 and plan.dp_shard > 1:
        out.append(f"dp_shard ({plan.dp_shard}) > 1 needs zero_stage >= 1")
    elif plan.zero_stage > 0 and plan.dp_shard == 1 and plan.dp > 1:
        out.append(f"zero_stage ({plan.zero_stage}) needs dp_shard > 1")
    if plan.sequence_parallel and plan.tp == 1:
        out.append("sequence_parallel needs tp > 1")
    if plan.offload:
        if not workload.constraints.allow_offload:
            out.append("offload is forbidden by --no-offload")
        if plan.backend != "deepspeed":
            out.append("optimizer offload needs backend=deepspeed")
        if plan.zero_stage == 0:
            out.append("optimizer offload needs zero_stage >= 1")
    if plan.backend == "deepspeed" and workload.lora:
        out.append(LORA_DEEPSPEED)
    if plan.backend == "deepspeed" and (plan.tp > 1 or plan.pp > 1):
        out.append(f"backend=deepspeed is planned for ZeRO data parallel only (tp={plan.tp}, pp={plan.pp} must be 1)")
    c = workload.constraints
    if c.tp is not None and plan.tp != c.tp:
        out.append(f"tp ({plan.tp}) differs from the fixed --tp {c.tp}")
    if c.pp is not None and plan.pp != c.pp:
        out.append(f"pp ({plan.pp}) differs from the fixed --pp {c.pp}")
    return out
