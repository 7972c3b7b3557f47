"""Per-device memory of one layout: model states by sharding, activations by recompute mode,
logits/loss buffers, pipeline in-flight micro-batches, FSDP gather buffers, comm buffers,
runtime reserve and fragmentation. Bytes everywhere; the worst pipeline stage is reported.

Activation bytes per layer per micro-batch (bf16, b sequences of s tokens, width h, kv width
h_kv, FFN width I), derived for a Llama block with SDPA/flash attention (no s^2 term), no dropout:
  none:      12sbh + 4sb*h_kv + 8sbI   (norm in/out x2, q, k, v, attn out; gate, up, silu, mul)
  selective: 8sbh + 4sb*h_kv + 4sbI    (norm outputs and the SwiGLU silu/mul are recomputed)
  full:      2sbh                      (only the layer input; the layer is re-run in backward)
With tensor + sequence parallel every term divides by tp. Plus flash's fp32 logsumexp (4sba).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from raytune_llama.planner.cluster import ClusterSpec
from raytune_llama.planner.model_spec import ModelSpec
from raytune_llama.planner.plan import ParallelPlan
from raytune_llama.planner.workload import Workload

GIB = 2**30
LOGIT_BYTES = 2 + 4 + 4  # bf16 logits, fp32 upcast for the loss, fp32 softmax/grad of logits


def layer_activation_bytes(model: ModelSpec, seq_len: int, mbs: int, tp: int, recompute: str,
                           sequence_parallel: bool = True) -> float:
    """Bytes one decoder layer keeps for backward, per micro-batch, per device."""
    sb = seq_len * mbs
    h, kv, inter = model.hidden_size, model.kv_dim, model.intermediate_size
    lse = 4.0 * sb * model.num_heads
    # Without sequence parallel the norm inputs/outputs (and a full-recompute checkpoint) are replicated.
    rep = 1 if (sequence_parallel or tp == 1) else tp
    if recompute == "full":
        return 2.0 * sb * h * rep / tp
    if recompute == "selective":
        return (4.0 * sb * h * rep + 4.0 * sb * h + 4.0 * sb * kv + 4.0 * sb * inter + lse) / tp
    return (8.0 * sb * h * rep + 4.0 * sb * h + 4.0 * sb * kv + 8.0 * sb * inter + lse) / tp


def stage_layers(model: ModelSpec, plan: ParallelPlan) -> int:
    """Decoder layers on the most loaded pipeline rank (uneven splits round up)."""
    chunks = plan.pp * plan.virtual_stages
    return math.ceil(model.num_layers / chunks) * plan.virtual_stages


def inflight_microbatches(plan: ParallelPlan, stage: int) -> float:
    """Micro-batches whose activations stage `stage` holds at its peak (in whole-stage units)."""
    m, p, v = plan.grad_accum, plan.pp, plan.virtual_stages
    if p == 1:
        return 1.0
    if plan.pp_schedule == "gpipe":
        return float(m)
    if plan.pp_schedule == "interleaved_1f1b":
        # Megatron's warm-up: 2(p-i-1) + (v-1)p chunks, plus the one being computed.
        chunks = min(m * v, 2 * (p - stage - 1) + (v - 1) * p + 1)
        return chunks / v
    return float(min(m, p - stage))  # 1F1B: stage i holds p - i


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted peak bytes on the worst device, by term."""

    params: float
    grads: float
    optimizer: float
    fsdp_buffers: float
    activations: float
    logits: float
    comm_buffers: float
    runtime: float
    fragmentation: float
    stage: int
    """Pipeline stage this breakdown belongs to (the one with the highest total)."""
    params_local: float
    """Parameters held by this device's TP/PP slice before data-parallel sharding."""

    @property
    def total(self) -> float:
        """Peak bytes per device."""
        return (self.params + self.grads + self.optimizer + self.fsdp_buffers + self.activations
                + self.logits + self.comm_buffers + self.runtime + self.fragmentation)

    def terms(self) -> dict[str, float]:
        """Each term by name (bytes)."""
        return {k: getattr(self, k) for k in ("params", "grads", "optimizer", "fsdp_buffers", "activations",
                                               "logits", "comm_buffers", "runtime", "fragmentation")}

    @property
    def dominant(self) -> str:
        """Name of the largest term."""
        terms = self.terms()
        return max(terms, key=lambda k: (terms[k], k))


def stage_params(model: ModelSpec, plan: ParallelPlan, stage: int) -> float:
    """Parameters held by one device of pipeline stage `stage` (after TP, before DP sharding)."""
    n = stage_layers(model, plan) * model.layer_params
    vh = model.vocab_size * model.hidden_size
    if stage == 0:
        n += vh
    if stage == plan.pp - 1:
        # An untied head, or a tied one that lives on another stage, needs its own copy here.
        n += model.hidden_size + (vh if (not model.tie_word_embeddings or plan.pp > 1) else 0)
    return n / plan.tp


def memory_breakdown(model: ModelSpec, cluster: ClusterSpec, workload: Workload,
                     plan: ParallelPlan) -> MemoryBreakdown:
    """Memory of the worst pipeline stage (first and last are the candidates)."""
    stages = sorted({0, plan.pp - 1})
    best = None
    for stage in stages:
        mb = _stage_memory(model, cluster, workload, plan, stage)
        if best is None or mb.total > best.total:
            best = mb
    assert best is not None
    return best


def _stage_memory(model: ModelSpec, cluster: ClusterSpec, workload: Workload, plan: ParallelPlan,
                  stage: int) -> MemoryBreakdown:
    hw = cluster.hardware
    w_b, g_b, o_b = workload.bytes_per_param
    psi = stage_params(model, plan, stage)
    d = plan.dp_shard
    z = plan.zero_stage
    params = w_b * psi / (d if z >= 3 else 1)
    grads = g_b * psi / (d if z >= 2 else 1)
    # DeepSpeed CPU offload moves fp32 master + moments to the host.
    optimizer = 0.0 if plan.offload else o_b * psi / (d if z >= 1 else 1)
    fsdp = 0.0
    if z >= 3 and d > 1:
        # Two blocks gathered (current + prefetch) and one block's unsharded grads before reduce-scatter.
        unit = model.layer_params / plan.tp
        if stage in (0, plan.pp - 1):
            unit = max(unit, model.vocab_size * model.hidden_size / plan.tp)
        fsdp = (2 * w_b + g_b) * unit
    s, b = workload.seq_len, plan.micro_batch_size
    sp = plan.sequence_parallel
    per_layer = layer_activation_bytes(model, s, b, plan.tp, plan.recompute, sp)
    working = layer_activation_bytes(model, s, b, plan.tp, "none", sp)  # the layer being (re)computed
    acts = (per_layer * stage_layers(model, plan) * inflight_microbatches(plan, stage) + working)
    acts *= hw.activation_scale
    logits = 0.0
    if stage == plan.pp - 1:
        logits = LOGIT_BYTES * s * b * model.vocab_size / plan.tp * hw.activation_scale
    # Gradient-reduction buckets (2 x 25M elements cap) and pipeline send/recv buffers.
    comm = 2 * min(g_b * psi, 50e6)
    if plan.pp > 1:
        comm += 4 * 2.0 * s * b * model.hidden_size / plan.tp
    frag = hw.fragmentation * (acts + logits + fsdp)
    return MemoryBreakdown(params, grads, optimizer, fsdp, acts, logits, comm, hw.runtime_reserved_bytes,
                           frag, stage, psi)


def memory_limit(cluster: ClusterSpec, workload: Workload) -> float:
    """Usable bytes per device after the user's headroom fraction."""
    return cluster.hardware.memory_bytes * (1.0 - workload.constraints.headroom)
