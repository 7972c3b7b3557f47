"""Step time of one layout: GEMMs at a size-dependent efficiency (roofline against memory
bandwidth), flash attention, memory-bound elementwise ops, recompute, TP collectives on the link
they actually use (MI250: GCD pair of one card vs across cards), pipeline p2p and bubble,
DP/ZeRO/FSDP collectives with overlap, optimizer step and CPU offload transfers.

Every collective costs bytes over bandwidth plus a fixed latency per call (`collective_latency_s`
x hops, hops = max(1, log2 group)); calls are counted per step the way the engine issues them
(`collective_calls`): per layer per micro-batch for TP/SP, per FSDP unit (each decoder layer +
the root) for ZeRO/FSDP, per gradient bucket for DDP/DeepSpeed, per micro-batch per stage boundary
for pipeline p2p. On a CPU node whose processes share cores (`cores_per_node`), every term runs
on the device's share of the cores (hardware.shared_view).

LoRA (`Workload.lora_rank` > 0): the frozen weights need no weight-gradient GEMMs (backward GEMMs
1x forward instead of 2x; the lm_head's too), the adapters' small GEMMs are timed as GEMMs, only
the adapters' gradients are reduced over data parallel, and FSDP still all-gathers the frozen base
(in the compute dtype) as it gathers trained weights. Documents mask: attention keeps the FLOPs
of a full causal row (SDPA with an arbitrary mask cannot skip the blocks outside a document), as
without the mask (docs/planner.md, "LoRA and document packing", on what this leaves out).

Mesh order, innermost first: [tp, pp, dp_shard, dp_replicate] (tp inside a node; dp outermost).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

from raytune_llama.planner.cluster import ClusterSpec
from raytune_llama.planner.hardware import HardwareSpec, shared_view
from raytune_llama.planner.memory_model import stage_adapter_params, stage_layers, stage_params
from raytune_llama.planner.model_spec import ModelSpec
from raytune_llama.planner.plan import ParallelPlan
from raytune_llama.planner.workload import Workload

ELEM_H = 72  # 44h norms + 16h rope + 12h residual adds
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP bucket_cap_mb
DS_BUCKET_BYTES = 1e9          # DeepSpeed reduce/allgather bucket (5e8 bf16 elements)


def call_latency(hw: HardwareSpec, group: int) -> float:
    """Fixed seconds of one collective call over `group` ranks (p2p: group 2)."""
    return hw.collective_latency_s * max(1.0, math.log2(group)) if group > 1 else 0.0


def tp_calls_per_layer(sequence_parallel: bool, recompute: str) -> int:
    """TP collective calls of one decoder layer per micro-batch, forward + backward: TP all-reduces
    the attention and MLP outputs forward and their input grads backward (4); SP replaces each by an
    all-gather + reduce-scatter pair (8); full recompute replays the forward's calls."""
    fwd = 4 if sequence_parallel else 2
    return 2 * fwd + (fwd if recompute == "full" else 0)


def gemm_time(hw: HardwareSpec, m: float, n: float, k: float) -> float:
    """Seconds for an (m x k) @ (k x n) bf16 GEMM: compute at a shape-dependent efficiency or memory bound."""
    e = hw.efficiency
    c = e.matmul_half_dim
    eff = e.matmul_max * (m / (m + c)) * (n / (n + c)) * (k / (k + c))
    flops_t = 2.0 * m * n * k / (hw.peak_flops * eff)
    bytes_t = 2.0 * (m * k + k * n + m * n) / (hw.memory_bw * e.memory_bw)
    return max(flops_t, bytes_t)


@dataclass(frozen=True)
class LayerTimes:
    """One decoder layer on one micro-batch on one device (seconds)."""

    fwd: float
    bwd: float
    recompute: float
    tp_comm: float
    gemm_fwd: float = 0.0
    """The base projections' GEMMs in forward (part of fwd)."""
    gemm_bwd: float = 0.0
    """The base projections' GEMMs in backward (part of bwd): 2x forward, 1x with LoRA (input
    gradients only: the frozen weights get none)."""
    adapter_fwd: float = 0.0
    """LoRA adapters' GEMMs and scale-add in forward (part of fwd)."""
    adapter_bwd: float = 0.0
    """LoRA adapters' GEMMs and scale-add in backward (part of bwd)."""
    attention: float = 0.0
    """Attention kernel in forward (part of fwd; backward 2.5x)."""


def adapter_times(model: ModelSpec, hw: HardwareSpec, m: float, tp: int, rank: int,
                  targets: tuple[str, ...]) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's LoRA adapters on m tokens: per targeted W [out,
    in] (split by TP as W is), forward x@A^T and h@B^T, backward dh = dy@B, dB, dA and dx += dh@A
    (4 GEMMs), plus the scale and add onto W's output (memory bound)."""
    if not rank:
        return 0.0, 0.0
    e = hw.efficiency
    fwd = bwd = 0.0
    for name in targets:
        fan_in, fan_out, split = model.linear_shapes()[name]
        i, o = (fan_in, fan_out / tp) if split == "col" else (fan_in / tp, fan_out)
        scale_add = 6.0 * m * o / (hw.memory_bw * e.memory_bw)  # read B's output and W's, write the sum (bf16)
        fwd += gemm_time(hw, m, rank, i) + gemm_time(hw, m, o, rank) + scale_add
        bwd += (gemm_time(hw, m, rank, o) + gemm_time(hw, o, rank, m) + gemm_time(hw, rank, i, m)
                + gemm_time(hw, m, i, rank) + scale_add)
    return fwd, bwd


@lru_cache(maxsize=4096)
def layer_times(model: ModelSpec, hw: HardwareSpec, seq_len: int, mbs: int, tp: int, recompute: str,
                tp_bw: float, sequence_parallel: bool = True, lora_rank: int = 0,
                lora_targets: tuple[str, ...] = ()) -> LayerTimes:
    """Forward, backward, recompute and exposed TP-collective time of one layer per micro-batch."""
    h, kv, inter = model.hidden_size, model.kv_dim, model.intermediate_size
    m = float(seq_len * mbs)  # sequence parallel gathers the full sequence before each matmul
    gemms = (gemm_time(hw, m, (h + 2 * kv) / tp, h) + gemm_time(hw, m, h, h / tp)
             + gemm_time(hw, m, 2 * inter / tp, h) + gemm_time(hw, m, h, inter / tp))
    e = hw.efficiency
    # Causal flash attention computes half of the 4*s^2*d forward FLOPs; its backward ~2.5x. A
    # documents mask is charged the same (full causal rows: no block outside a document skipped).
    attn_flops = 2.0 * mbs * seq_len * seq_len * h / tp
    attn_eff = e.matmul_max * e.attention * seq_len / (seq_len + e.matmul_half_dim)
    attn = attn_flops / (hw.peak_flops * attn_eff)
    # Memory-bound ops, eager (unfused) kernels, bytes per token: two fp32-upcast RMSNorms ~5 passes
    # each (~44h), rope on q/k (~8 passes, 16(h+h_kv)), residual adds (12h), SiLU and mul (10I).
    elem = m * (ELEM_H * h + 16 * kv + 10 * inter) / tp / (hw.memory_bw * e.memory_bw)
    a_fwd, a_bwd = adapter_times(model, hw, m, tp, lora_rank, lora_targets)
    # Backward GEMMs: input gradients + weight gradients; LoRA's frozen weights need only the former.
    gemm_bwd = (1.0 if lora_rank else 2.0) * gemms
    fwd = gemms + attn + elem + a_fwd
    bwd = gemm_bwd + 2.5 * attn + 2.0 * elem + a_bwd + hw.layer_overhead_s
    if recompute == "full":
        rec = fwd
    elif recompute == "selective":
        # Selective re-runs the norms and SiLU*mul: most of the elementwise traffic.
        rec = elem * (44 * h + 10 * inter) / (ELEM_H * h + 16 * kv + 10 * inter)
    else:
        rec = 0.0
    tp_comm = 0.0
    if tp > 1:
        # Same bytes either way: 2 all-reduce-equivalents forward, 2 backward (+2 when the forward
        # is recomputed), ring cost 2(t-1)/t of an s*b*h bf16 message; latency per call.
        n_ar = 4 + (2 if recompute == "full" else 0)
        msg = 2.0 * m * h
        bw_t = n_ar * 2.0 * (tp - 1) / tp * msg / (tp_bw * e.network)
        lat = tp_calls_per_layer(sequence_parallel, recompute) * call_latency(hw, tp)
        tp_comm = (bw_t + lat) * (1.0 - e.tp_overlap)
    return LayerTimes(fwd, bwd, rec, tp_comm, gemms, gemm_bwd, a_fwd, a_bwd, attn)


def group_bandwidth(cluster: ClusterSpec, span: int) -> float:
    """Per-device link bandwidth of a group spanning `span` consecutive ranks (MI250: a GCD pair
    of one card is fast, across cards slow; beyond a node the NIC share per device)."""
    hw = cluster.hardware
    if span > cluster.devices_per_node:
        return hw.inter_node_bw
    if hw.devices_per_card > 1 and span <= hw.devices_per_card and hw.intra_card_bw > 0:
        return hw.intra_card_bw
    return hw.intra_node_bw


@dataclass(frozen=True)
class TimeBreakdown:
    """Predicted seconds per optimizer step, by term (compute terms include the bubble split out)."""

    compute: float
    recompute: float
    tp_comm: float
    pp_p2p: float
    bubble: float
    dp_comm_exposed: float
    dp_comm_total: float
    optimizer: float
    offload: float
    step_time: float
    tokens_per_s: float
    tokens_per_s_per_device: float
    mfu: float
    hfu: float
    bubble_fraction: float
    collective_calls: float = 0.0
    """Collective/p2p calls one device issues per step (all groups)."""

    def terms(self) -> dict[str, float]:
        """Additive terms of step_time by name."""
        return {k: getattr(self, k) for k in ("compute", "recompute", "tp_comm", "pp_p2p", "bubble",
                                               "dp_comm_exposed", "optimizer", "offload")}


def _collective_s(cluster: ClusterSpec, nbytes: float, group: int, span: int, kind: str) -> float:
    """Ring bandwidth time per device (latency is counted per call in step_time): all-reduce moves
    2(g-1)/g of the buffer, all-gather/reduce-scatter (g-1)/g."""
    if group <= 1:
        return 0.0
    hw = cluster.hardware
    factor = (2.0 if kind == "ar" else 1.0) * (group - 1) / group
    return factor * nbytes / (group_bandwidth(cluster, span) * hw.efficiency.network)


def dp_calls(plan: ParallelPlan, nl: int, nbytes: float, lora: bool = False) -> tuple[float, float]:
    """Data-parallel collective calls on the dp group as the engine issues them: (per micro-batch,
    per step). FSDP2 units are each decoder layer + the root; params are resharded after every
    backward, so ZeRO-1/2 all-gather once per micro-batch and ZeRO-3 twice (root once); ZeRO-2/3
    reduce-scatter every micro-batch, ZeRO-1 and DDP only on the last one. `nbytes`: the gradient
    bytes reduced. With LoRA the root (embedding, final norm, lm_head) trains nothing, so only
    the decoder layers' units reduce."""
    units, z = nl + 1, plan.zero_stage
    reducing = nl if lora else units
    if plan.dp <= 1:
        return 0.0, 0.0
    if plan.backend == "deepspeed" and z in (1, 2):
        nb = max(1, math.ceil(nbytes / DS_BUCKET_BYTES))
        return (nb, nb) if z == 2 else (0.0, 2 * nb)
    if z == 0:  # DDP buckets, or FSDP2 replicate (one all-reduce per unit) under TP/PP
        return 0.0, (max(1, math.ceil(nbytes / DDP_BUCKET_BYTES)) if plan.tp == 1 and plan.pp == 1 else reducing)
    if z == 1:
        return units, reducing
    return (units + reducing, 0.0) if z == 2 else (2 * units - 1 + reducing, 0.0)


def step_time(model: ModelSpec, cluster: ClusterSpec, workload: Workload, plan: ParallelPlan) -> TimeBreakdown:
    """Predicted step time and throughput of one layout."""
    peak = cluster.hardware.peak_flops
    cluster = replace(cluster, hardware=shared_view(cluster.hardware, cluster.devices_per_node))
    hw = cluster.hardware
    e = hw.efficiency
    s, b, m = workload.seq_len, plan.micro_batch_size, plan.grad_accum
    p, v, t = plan.pp, plan.virtual_stages, plan.tp
    sp = plan.sequence_parallel
    lora = workload.lora
    targets = workload.lora_targets if lora else ()
    lt = layer_times(model, hw, s, b, t, plan.recompute, group_bandwidth(cluster, t), sp, workload.lora_rank,
                     targets)
    nl = stage_layers(model, plan)
    tokens_mb = s * b
    # Last stage also runs the lm_head GEMM and the fp32 cross-entropy (memory bound); its backward
    # is two GEMMs (input and weight gradients), one with LoRA (the lm_head is frozen).
    head_f = gemm_time(hw, tokens_mb, model.vocab_size / t, model.hidden_size)
    ce = tokens_mb * model.vocab_size / t * 10.0 * 2 / (hw.memory_bw * e.memory_bw)
    head = (2.0 if lora else 3.0) * head_f + ce + hw.layer_overhead_s  # embedding + head dispatch counts as one layer
    comp_mb = nl * (lt.fwd + lt.bwd) + head
    rec_mb = nl * lt.recompute
    # Embedding (fwd all-reduce / SP reduce-scatter), lm_head (input-grad reduction; SP: input
    # all-gather too) and the vocab-parallel cross-entropy (all-reduces of the max, the sum of
    # exponentials and the target logit: the logits are never gathered) add 5 TP calls per
    # micro-batch, 6 with SP.
    tp_head_calls = (6 if sp else 5) if t > 1 else 0
    tp_mb = nl * lt.tp_comm + tp_head_calls * call_latency(hw, t) * (1.0 - e.tp_overlap)
    p2p_mb = 0.0
    if p > 1:
        msg = 2.0 * tokens_mb * model.hidden_size / t
        bw = group_bandwidth(cluster, t * p) * e.network
        p2p_mb = 2 * v * (msg / bw + call_latency(hw, 2)) * (1.0 - e.pp_overlap)
    t_mb = comp_mb + rec_mb + tp_mb + p2p_mb
    bubble = (p - 1) / v * t_mb if p > 1 else 0.0

    # Data-parallel collectives of this stage's parameters (bf16 on the wire): FSDP all-gathers
    # every weight (with LoRA the frozen base too); gradients are reduced only for what trains
    # (with LoRA the adapters alone).
    psi = max(stage_params(model, plan, 0), stage_params(model, plan, p - 1))
    adapters = stage_adapter_params(model, plan, workload)
    d, r = plan.dp_shard, plan.dp_replicate
    span_shard, span_all = t * p * d, t * p * d * r
    nbytes = 2.0 * psi                                # gathered
    gbytes = 2.0 * adapters if lora else nbytes       # reduced
    fb_mb = nl * (lt.fwd + lt.bwd + lt.recompute)
    bwd_mb = nl * (lt.bwd + lt.recompute)
    z = plan.zero_stage
    if z == 0:
        per_step, per_mb = _collective_s(cluster, gbytes, r, span_all, "ar"), 0.0
        window = bwd_mb
    elif z == 1:
        per_step = (_collective_s(cluster, gbytes, d, span_shard, "rs")
                    + _collective_s(cluster, nbytes, d, span_shard, "ag"))
        per_mb = 0.0
        window = bwd_mb
    elif z == 2:
        per_mb = _collective_s(cluster, gbytes, d, span_shard, "rs")
        per_step = _collective_s(cluster, nbytes, d, span_shard, "ag")
        window = m * bwd_mb
    else:
        per_mb = (2 * _collective_s(cluster, nbytes, d, span_shard, "ag")
                  + _collective_s(cluster, gbytes, d, span_shard, "rs"))
        per_step = 0.0
        window = m * fb_mb
    calls_mb, calls_step = dp_calls(plan, nl, gbytes, lora)
    g_dp = r if z == 0 else d
    per_mb += calls_mb * call_latency(hw, g_dp)
    per_step += calls_step * call_latency(hw, g_dp)
    hsdp_calls = nl if lora else nl + 1
    if z >= 1 and r > 1:  # HSDP replica all-reduce, one per unit
        per_step += _collective_s(cluster, gbytes / d, r, span_all, "ar") + hsdp_calls * call_latency(hw, r)
    dp_total = per_step + m * per_mb
    # At least one layer's bucket waits for the last backward; the rest hides behind compute.
    dp_exposed = max(dp_total - e.dp_overlap * window, dp_total / max(nl, 1)) if dp_total > 0 else 0.0
    # Engine bookkeeping, not overlapped: token count + loss all-reduce over dp, loss and grad
    # norm over pp.
    sync_calls = (2 if plan.dp > 1 else 0, 2 if p > 1 else 0)
    sync = sync_calls[0] * call_latency(hw, plan.dp) + sync_calls[1] * call_latency(hw, p)
    dp_exposed += sync
    dp_total += sync
    n_calls = (m * ((nl * tp_calls_per_layer(sp, plan.recompute) + tp_head_calls if t > 1 else 0)
                    + (2 * v if p > 1 else 0) + calls_mb) + calls_step + sum(sync_calls)
               + (hsdp_calls if z >= 1 and r > 1 else 0))

    shard = (adapters if lora else psi) / (d if z >= 1 else 1)
    opt_bytes = 28.0 if workload.optimizer == "adamw" else 14.0
    optimizer = 0.0 if plan.offload else shard * opt_bytes / (hw.memory_bw * e.memory_bw)
    offload = 0.0
    if plan.offload:
        per_node = cluster.devices_per_node
        offload = 4.0 * shard / hw.host_link_bw + shard * per_node / hw.cpu_adam_params_per_s

    pipe = m * t_mb + bubble
    total = pipe + dp_exposed + optimizer + offload
    tokens = workload.global_batch * s
    world = cluster.world_size
    model_flops = model.model_flops_per_token(s, workload.lora_rank, workload.lora_targets)
    mfu = model_flops * tokens / (total * world * peak)
    # Full recompute runs the forward twice: 4/3 of full fine-tuning's model FLOPs, about 3/2 of LoRA's.
    rerun = model.forward_flops_per_token(s, workload.lora_rank, workload.lora_targets)
    hfu = mfu * ((model_flops + rerun) / model_flops if plan.recompute == "full" else 1.0)
    return TimeBreakdown(
        compute=m * comp_mb, recompute=m * rec_mb, tp_comm=m * tp_mb, pp_p2p=m * p2p_mb, bubble=bubble,
        dp_comm_exposed=dp_exposed, dp_comm_total=dp_total, optimizer=optimizer, offload=offload,
        step_time=total, tokens_per_s=tokens / total, tokens_per_s_per_device=tokens / total / world,
        mfu=mfu, hfu=hfu, bubble_fraction=bubble / pipe if pipe else 0.0, collective_calls=n_calls)
