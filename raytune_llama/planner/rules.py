"""The hard rules every layout must satisfy, in one place: the planner's search and estimate
use them to reject layouts, and the engine checks the same rules before it builds anything
(engine/parallel/plan_check.py). Each violation carries a code (which rule) and a sentence
naming the knob, the values and what would be legal."""
from __future__ import annotations

from dataclasses import dataclass

from raytune_llama.planner.cluster import ClusterSpec
from raytune_llama.planner.model_spec import ModelSpec
from raytune_llama.planner.plan import BACKENDS, PP_SCHEDULES, RECOMPUTE_MODES, ZERO_STAGES, ParallelPlan
from raytune_llama.planner.workload import OPTIMIZERS, Workload


@dataclass(frozen=True)
class Violation:
    """One broken rule: `code` names the rule (stable, for programs), `message` explains it."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


STRUCTURAL = frozenset({"degree", "world_size", "global_batch", "lora_backend"})
"""Codes of layouts that cannot run at all, whose memory and time are not even estimated."""

DEGREES = ("dp_replicate", "dp_shard", "tp", "pp", "virtual_stages", "micro_batch_size", "grad_accum")


def tp_violations(model: ModelSpec | None, tp: int, devices_per_node: int | None = None) -> list[Violation]:
    """Why this tensor-parallel degree is illegal (crossing nodes first), or []."""
    if tp == 1:
        return []
    if devices_per_node is not None and (tp > devices_per_node or devices_per_node % tp):
        return [Violation("tp_across_nodes", f"tensor parallel degree ({tp}) would cross nodes "
                                             f"(devices_per_node={devices_per_node})")]
    if model is None:
        return []
    out = []
    if model.num_heads % tp or model.num_kv_heads % tp:
        out.append(Violation("tp_heads", f"tensor parallel degree ({tp}) must divide the number of attention "
                                         f"heads ({model.num_heads}) and key/value heads ({model.num_kv_heads})"))
    if model.intermediate_size % tp:
        out.append(Violation("tp_intermediate", f"tensor parallel degree ({tp}) must divide the intermediate "
                                                f"(FFN) size ({model.intermediate_size})"))
    return out


def can_sequence_parallel(model: ModelSpec, tp: int) -> bool:
    """Sequence parallel needs tp > 1 dividing the vocabulary (the vocab-sharded embedding and
    head move activations between full and sequence-sharded form)."""
    return tp > 1 and model.vocab_size % tp == 0


def _pipeline_violations(model: ModelSpec | None, plan: ParallelPlan) -> list[Violation]:
    out = []
    stages = plan.pp * plan.virtual_stages
    if model is not None and stages > model.num_layers:
        out.append(Violation("pp_layers", f"pp*virtual_stages ({stages}) must be <= the number of decoder "
                                          f"layers ({model.num_layers})"))
    if plan.pp_schedule not in PP_SCHEDULES:
        out.append(Violation("pp_schedule", f"pp_schedule ({plan.pp_schedule}) must be one of {PP_SCHEDULES}"))
    if plan.virtual_stages > 1 and plan.pp_schedule != "interleaved_1f1b":
        out.append(Violation("pp_schedule", f"virtual_stages ({plan.virtual_stages}) > 1 needs "
                                            f"pp_schedule=interleaved_1f1b (got {plan.pp_schedule})"))
    if plan.pp > 1 and plan.pp_schedule == "interleaved_1f1b" and plan.grad_accum % plan.pp:
        out.append(Violation("pp_microbatches", f"interleaved 1F1B needs grad_accum (micro-batches, "
                                                f"{plan.grad_accum}) to be a multiple of pp ({plan.pp})"))
    if plan.pp > 1 and plan.pp_schedule == "1f1b" and plan.grad_accum < plan.pp:
        out.append(Violation("pp_microbatches", f"1F1B needs grad_accum (micro-batches, {plan.grad_accum}) "
                                                f">= pp ({plan.pp})"))
    return out


def _data_parallel_violations(plan: ParallelPlan) -> list[Violation]:
    if plan.zero_stage not in ZERO_STAGES:
        return [Violation("zero_stage", f"zero_stage ({plan.zero_stage}) must be one of {ZERO_STAGES}")]
    if plan.zero_stage == 0 and plan.dp_shard > 1:
        return [Violation("zero_stage", f"dp_shard ({plan.dp_shard}) > 1 needs zero_stage >= 1")]
    if plan.zero_stage > 0 and plan.dp_shard == 1 and plan.dp > 1:
        return [Violation("zero_stage", f"zero_stage ({plan.zero_stage}) needs dp_shard > 1")]
    return []


def _backend_violations(plan: ParallelPlan) -> list[Violation]:
    out = []
    if plan.backend not in BACKENDS:
        out.append(Violation("backend", f"backend ({plan.backend}) must be one of {BACKENDS}"))
    if plan.backend == "deepspeed" and (plan.tp > 1 or plan.pp > 1):
        out.append(Violation("backend", f"backend=deepspeed runs ZeRO data parallel only (tp={plan.tp}, "
                                        f"pp={plan.pp} must be 1); use backend=torch for TP/PP"))
    if plan.offload and plan.backend != "deepspeed":
        out.append(Violation("offload", "optimizer offload needs backend=deepspeed"))
    if plan.offload and plan.zero_stage == 0:
        out.append(Violation("offload", "optimizer offload needs zero_stage >= 1"))
    return out


def _lora_violations(plan: ParallelPlan, lora_dropout: float) -> list[Violation]:
    out = []
    if plan.backend == "deepspeed":
        out.append(Violation("lora_backend", "train.lora: LoRA runs on the torch backend only, not backend "
                                             "'deepspeed' (DeepSpeed would partition the frozen base with the "
                                             "adapters and keep fp32 masters and optimizer state for all of it); "
                                             "use a torch layout (backend=torch: FSDP2 zero_stage 1-3, DDP, TP, PP)"))
    if plan.tp > 1 and lora_dropout > 0:
        out.append(Violation("lora_dropout", f"train.lora.dropout: {lora_dropout} with tensor parallel "
                                             f"(tp={plan.tp}): the adapters of the column-parallel projections see "
                                             f"the same input on every tp rank and would each draw their own dropout "
                                             f"mask (that needs a tp-synchronised RNG); use train.lora.dropout: 0 or "
                                             f"a layout with tp=1"))
    return out


def layout_violations(model: ModelSpec | None, plan: ParallelPlan, *, lora_dropout: float | None = None,
                      pure_bf16: bool = False, devices_per_node: int | None = None) -> list[Violation]:
    """Every rule a layout breaks that needs only the model (None: skip the model's rules),
    the plan, with LoRA its dropout (None: full fine-tuning) and whether the weights and
    moments are pure bf16 (parallel.master_weights: bf16): what the engine checks."""
    out = [Violation("degree", f"{name} ({getattr(plan, name)}) must be >= 1")
           for name in DEGREES if getattr(plan, name) < 1]
    if out:
        return out
    out += tp_violations(model, plan.tp, devices_per_node)
    if plan.sequence_parallel and plan.tp == 1:
        out.append(Violation("sequence_parallel", "sequence_parallel needs tp > 1"))
    elif plan.sequence_parallel and model is not None and not can_sequence_parallel(model, plan.tp):
        out.append(Violation("sequence_parallel", f"sequence parallel needs the tensor parallel degree ({plan.tp}) "
                                                  f"to divide the vocabulary size ({model.vocab_size})"))
    out += _pipeline_violations(model, plan)
    if plan.recompute not in RECOMPUTE_MODES:
        out.append(Violation("recompute", f"recompute ({plan.recompute}) must be one of {RECOMPUTE_MODES}"))
    out += _data_parallel_violations(plan) + _backend_violations(plan)
    if pure_bf16 and plan.backend == "deepspeed":
        out.append(Violation("master_weights", "parallel.master_weights: 'bf16' needs backend 'torch' (DeepSpeed's "
                                               "bf16 mode always keeps fp32 master weights); use master_weights: "
                                               "fp32, or a torch layout"))
    if lora_dropout is not None:
        out += _lora_violations(plan, lora_dropout)
    return out


def plan_violations(model: ModelSpec, cluster: ClusterSpec, workload: Workload, plan: ParallelPlan) -> list[Violation]:
    """Every rule a layout breaks on this cluster and workload (empty when it is legal)."""
    out = layout_violations(model, plan, lora_dropout=0.0 if workload.lora else None,
                            pure_bf16=OPTIMIZERS[workload.optimizer] == "bf16",
                            devices_per_node=cluster.devices_per_node)
    if any(v.code == "degree" for v in out):
        return out
    if plan.world_size != cluster.world_size:
        out.insert(0, Violation("world_size", f"dp_replicate*dp_shard*tp*pp ({plan.world_size}) must equal the "
                                              f"world size ({cluster.world_size})"))
    if plan.global_batch() != workload.global_batch:
        out.append(Violation("global_batch", f"dp*micro_batch_size*grad_accum ({plan.global_batch()}) must equal "
                                             f"the global batch ({workload.global_batch})"))
    c = workload.constraints
    if plan.offload and not c.allow_offload:
        out.append(Violation("constraint", "offload is forbidden by --no-offload"))
    if c.tp is not None and plan.tp != c.tp:
        out.append(Violation("constraint", f"tp ({plan.tp}) differs from the fixed --tp {c.tp}"))
    if c.pp is not None and plan.pp != c.pp:
        out.append(Violation("constraint", f"pp ({plan.pp}) differs from the fixed --pp {c.pp}"))
    return out
