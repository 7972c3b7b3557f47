"""Per-device memory of one layout: model states by engine family and precision, activations by
recompute mode, logits/loss buffers, pipeline in-flight micro-batches, FSDP gather buffers, comm
buffers, runtime reserve and fragmentation. Bytes everywhere; the worst pipeline stage is reported.

Model states (`model_state_bytes`, the one function both the memory breakdown and the search's
early rejection use) count every copy the engine keeps of each parameter, per family; the
bytes-per-parameter table and what each copy is are in docs/planner.md ("Memory model").
Precision: `Workload.optimizer` fixes the master dtype (adamw: fp32 weights and AdamW moments;
adamw_bf16: pure bf16 weights, gradients and moments) and `Workload.compute_dtype` the dtype of
the forward/backward (bf16 on accelerators, fp32 on CPU).

Activation bytes per layer per micro-batch (b sequences of s tokens, width h, kv width h_kv, FFN
width I; in bf16 elements of 2 bytes, scaled by compute bytes / 2 for fp32 compute), derived for a
Llama block with SDPA/flash attention (no s^2 term), no dropout, and checked against the dry run
(engine/dryrun/, docs/planner.md "How the planner is checked"):
  none:      12sbh + 4sb*h_kv + 8sbI   (norm in/out x2, q, k, v, attn out; gate, up, silu, mul)
  selective: what engine/parallel/recompute.py saves: every matmul output (q, k, v, o, gate, up,
             down), the attention output and the layer input: 10sbh + 4sb*h_kv + 4sbI. Under
             tensor parallel the o/down outputs are saved before their reduction (full size,
             partial sums), and so are the collectives' outputs: with sequence parallel the two
             all-gathered norm outputs (full sequence) and the two reduce-scattered outputs,
             8sbh + (10sbh + 4sb*h_kv + 4sbI)/tp; without it the replicated layer input and the
             two all-reduced outputs, 10sbh + (4sbh + 4sb*h_kv + 4sbI)/tp.
  full:      2sbh                      (only the layer input; the layer is re-run in backward)
With tensor + sequence parallel the none/full terms divide by tp. Plus flash's fp32 logsumexp (4sba).

LoRA (`Workload.lora_rank` > 0): the base weights are frozen in the compute dtype, sharded as the
layout shards weights, with no gradients and no optimizer state; only the adapters (A [r, in],
B [out, r] per targeted projection) keep master weights, gradients and AdamW moments
(`_lora_states`). Activations are full fine-tuning's plus each adapter's [tokens, r] intermediate;
selective recompute also saves each adapter's B output (a matmul output).

Documents mask (`Workload.attention_mask == "documents"`): the boolean [b, 1, s, s] mask
(b*s^2 bytes) lives through each in-flight micro-batch's forward and backward; SDPA converts it
to an additive mask of the compute dtype inside every call, and HF repeats K/V to every head
when a mask is given; both are saved for backward per layer (`attention_mask_bytes`).

The peak is taken over the phases of a step (`PHASES`), each with the terms live then: the loss
(all saved activations, the head's and the loss's buffers), the first layer's backward (saved
activations, the layer being recomputed, gathered FSDP units) and the end of backward (every
gradient, the last unit's reduction buffers). Gradients count in the first two only where they
outlive a step's first micro-batch (gradient accumulation, pipelining).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from raytune_llama.planner.cluster import ClusterSpec
from raytune_llama.planner.model_spec import ModelSpec
from raytune_llama.planner.plan import ParallelPlan
from raytune_llama.planner.workload import Workload

GIB = 2**30
FP32 = 4
# Per logit at the loss's peak, in backward (the compute-dtype logits are freed by then): the fp32
# log-probabilities saved by log-softmax and two fp32 gradients (nll's and log-softmax's); torch's
# vocab-parallel cross-entropy (loss_parallel) keeps a third fp32 temporary in its fused backward.
LOSS_BYTES = 4 + 4 + 4
LOSS_PARALLEL_BYTES = LOSS_BYTES + 4
PHASES = ("loss", "backward", "end of backward")
# DeepSpeed ZeRO defaults the engine keeps (its config sets none of them).
DS_REDUCE_BUCKET = 5e8   # zero_optimization.reduce_bucket_size, elements
DS_MAX_LIVE = 1e9        # stage3_max_live_parameters (max_reuse_distance is 1e9 too), elements
DS_SUB_GROUP = 1e9       # sub_group_size: ZeRO-3 upcasts the gradient partition per sub-group, elements

STATE_FAMILIES = ("single", "ddp", "replicate", "fsdp_zero1", "fsdp_zero2", "fsdp_zero3", "fsdp_pp",
                  "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3")


def logit_bytes(vocab_parallel: bool = False) -> int:
    """Bytes per logit live at the loss's peak on the last stage (fp32 whatever the compute dtype)."""
    return LOSS_PARALLEL_BYTES if vocab_parallel else LOSS_BYTES


def head_bytes(model: ModelSpec, seq_len: int, mbs: int, tp: int, sequence_parallel: bool,
               dtype_bytes: int) -> float:
    """Last stage, besides the logits: the final norm's fp32 input and compute-dtype output, and
    under sequence parallel the all-gathered full-sequence input of the lm_head."""
    sbh = seq_len * mbs * model.hidden_size
    norm = (FP32 + dtype_bytes) * sbh / (tp if sequence_parallel else 1)
    return norm + (dtype_bytes * sbh if (tp > 1 and sequence_parallel) else 0.0)


def layer_activation_bytes(model: ModelSpec, seq_len: int, mbs: int, tp: int, recompute: str,
                           sequence_parallel: bool = True, dtype_bytes: int = 2) -> float:
    """Bytes one decoder layer keeps for backward, per micro-batch, per device."""
    sb = seq_len * mbs
    h, kv, inter = model.hidden_size, model.kv_dim, model.intermediate_size
    e = dtype_bytes / 2.0  # the coefficients below count bf16 (2-byte) elements
    lse = 4.0 * sb * model.num_heads  # flash/SDPA logsumexp is fp32 in any compute dtype
    # Without sequence parallel the norm inputs/outputs (and a full-recompute checkpoint) are replicated.
    rep = 1 if (sequence_parallel or tp == 1) else tp
    if recompute == "full":
        return e * 2.0 * sb * h * rep / tp
    if recompute == "selective":
        sharded = 4.0 * sb * kv + 4.0 * sb * inter
        if tp == 1:
            return e * (10.0 * sb * h + sharded) + lse
        if sequence_parallel:
            return e * (8.0 * sb * h + (10.0 * sb * h + sharded) / tp) + lse / tp
        return e * (10.0 * sb * h + (4.0 * sb * h + sharded) / tp) + lse / tp
    return (e * (8.0 * sb * h * rep + 4.0 * sb * h + 4.0 * sb * kv + 8.0 * sb * inter) + lse) / tp


def lora_layer_activation_bytes(model: ModelSpec, seq_len: int, mbs: int, tp: int, recompute: str,
                                rank: int, targets: tuple[str, ...], sequence_parallel: bool = True,
                                dtype_bytes: int = 2) -> float:
    """What LoRA adds to one decoder layer's saved activations per micro-batch per device: each
    adapter's A output [tokens, r] (compute dtype; not divided by TP). Selective recompute saves
    every matmul output, so also each adapter's B output [tokens, out]: a column-parallel
    projection's /tp (its B is column-parallel), a row-parallel one's full size (B replicated),
    on a sequence shard under sequence parallel (A's partial sums are reduce-scattered along the
    sequence before B). Full recompute keeps only the layer input (nothing added)."""
    if not rank or recompute == "full":
        return 0.0
    sb = seq_len * mbs
    added = dtype_bytes * sb * rank * len(targets)
    if recompute == "selective":
        shapes = model.linear_shapes()
        row_div = tp if sequence_parallel else 1
        added += dtype_bytes * sb * sum(shapes[t][1] / (tp if shapes[t][2] == "col" else row_div) for t in targets)
    return added


def attention_mask_bytes(workload: Workload, plan: ParallelPlan, model: ModelSpec,
                         stage: int) -> tuple[float, float, float]:
    """Bytes the documents mask adds on one device of `stage` (all zero for a causal mask):
    (boolean masks held, per-layer copies saved for backward, one layer's copies being made by
    the layer being (re)computed).
    * The boolean [b, 1, s, s] mask (1 byte per element; not split by TP: SDPA sees the full
      sequence) is built once per forward of a stage (of each model chunk when interleaved) and
      lives until that micro-batch's backward ends: one per in-flight micro-batch and chunk.
    * Per layer, as measured on torch 2.13 / transformers 5.24 (docs/planner.md): SDPA converts a
      boolean mask to an additive mask of the query's dtype inside every call (c*b*s^2) and saves
      it for backward; and with a mask HF's SDPA attention repeats K and V to every query head
      (GQA is left to SDPA only without a mask), which SDPA saves instead of the kv-head K and V:
      2*c*s*b*(h - h_kv)/tp more. Without recompute every layer of every in-flight micro-batch
      holds both; with selective or full recompute they are recomputed, one layer at a time."""
    if workload.attention_mask != "documents":
        return 0.0, 0.0, 0.0
    b, s, c = float(plan.micro_batch_size), workload.seq_len, workload.compute_bytes
    inflight = inflight_microbatches(plan, stage)
    held = b * s * s * inflight * plan.virtual_stages
    per_layer = c * b * s * s + 2.0 * c * s * b * (model.hidden_size - model.kv_dim) / plan.tp
    if plan.recompute == "none":
        return held, per_layer * stage_layers(model, plan) * inflight, 0.0
    return held, 0.0, per_layer


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
    state_family: str = ""
    """How the engine holds the model states (one of STATE_FAMILIES)."""
    phase: str = ""
    """The moment of the step the terms are taken at (one of PHASES): the one with the highest total."""
    frozen_base: float = 0.0
    """LoRA: bytes of the frozen base weights inside `params` (sharded + kept-gathered copies;
    ZeRO-3's in-flight gathered blocks stay in `fsdp_buffers`)."""
    adapters: float = 0.0
    """LoRA: bytes of the adapters inside params + grads + optimizer (weights, compute copies,
    gradients, AdamW moments)."""
    adapter_params_local: float = 0.0
    """LoRA: adapter parameters held by this device's TP/PP slice before data-parallel sharding."""
    attention_mask: float = 0.0
    """Documents mask: bytes it adds inside `activations` (boolean masks, SDPA's additive copies
    and the K/V repeated to every head; `attention_mask_bytes`)."""

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


def matmul_weights(model: ModelSpec, plan: ParallelPlan, stage: int) -> float:
    """Parameters of stage `stage` (per device) that bf16 autocast casts and caches: every linear
    weight (and qkv bias) of its layers and the lm_head; not the embedding lookup or the norms."""
    n = stage_layers(model, plan) * (model.layer_params - 2 * model.hidden_size)
    if stage == plan.pp - 1:
        n += model.vocab_size * model.hidden_size  # lm_head (tied or not, it is an F.linear input)
    return n / plan.tp


@dataclass(frozen=True)
class ModelStateBytes:
    """Model-state bytes of one device of one pipeline stage, by the breakdown term they land in."""

    params: float
    """Every resident copy of the weights: (sharded) masters, unsharded compute copies kept from
    forward to backward, bf16 autocast casts; DeepSpeed: the module plus its fp32 master partition."""
    grads: float
    """Gradients at their peak (unsharded accumulators, shards, DeepSpeed's fp32 step partition)."""
    optimizer: float
    """AdamW moments (exp_avg, exp_avg_sq)."""
    buffers: float
    """In-flight per-unit buffers: gathered FSDP blocks, one unit's gradient before its reduction,
    DeepSpeed ZeRO-3 gathered parameters."""
    comm: float
    """Gradient buckets: DDP's bucket copy of the gradients, DeepSpeed's reduce bucket."""
    family: str
    """One of STATE_FAMILIES."""
    params_local: float
    """Parameters of this device's TP/PP slice before data-parallel sharding."""
    backward_buffers: float | None = None
    """In flight while a decoder layer runs backward, where it differs from `buffers`."""
    end_buffers: float | None = None
    """In flight at the end of backward (the last unit's reduction), where it differs from `buffers`."""
    freed_by_end: float = 0.0
    """Part of `params` freed before the end of backward (ZeRO-3's root, resharded after its backward)."""
    frozen: float = 0.0
    """LoRA: part of `params` that is the frozen base (the rest of params, grads and optimizer are
    the adapters')."""
    adapters_local: float = 0.0
    """LoRA: adapter parameters of this device's TP/PP slice before data-parallel sharding."""

    @property
    def total(self) -> float:
        """All model-state bytes."""
        return self.params + self.grads + self.optimizer + self.buffers + self.comm

    @property
    def end_total(self) -> float:
        """Model-state bytes at the end of backward: never more than the step's peak."""
        end = self.buffers if self.end_buffers is None else self.end_buffers
        return self.params - self.freed_by_end + self.grads + self.optimizer + end + self.comm


def state_family(plan: ParallelPlan) -> str:
    """How the engine holds model states for this layout (data_parallel.py / deepspeed_backend.py)."""
    if plan.backend == "deepspeed":
        return f"deepspeed_zero{max(1, plan.zero_stage)}"
    if plan.dp == 1:
        return "single"  # no data-parallel wrapper (tp and/or pp only, or one device)
    if plan.zero_stage == 0:
        return "ddp" if plan.tp == 1 and plan.pp == 1 else "replicate"
    if plan.pp > 1:
        return "fsdp_pp"
    return f"fsdp_zero{plan.zero_stage}"


def stage_adapter_params(model: ModelSpec, plan: ParallelPlan, workload: Workload) -> float:
    """LoRA adapter parameters held by one device of the most loaded stage (after TP, before DP
    sharding); adapters live only in decoder layers, so every stage holds the same."""
    if not workload.lora:
        return 0.0
    return stage_layers(model, plan) * model.lora_layer_params(workload.lora_rank, workload.lora_targets, plan.tp)


def model_state_bytes(model: ModelSpec, plan: ParallelPlan, workload: Workload, stage: int) -> ModelStateBytes:
    """Parameter, gradient, optimizer and gradient-buffer bytes one device of `stage` allocates."""
    psi = stage_params(model, plan, stage)
    fam = state_family(plan)
    c = workload.compute_bytes   # forward/backward dtype
    m = workload.master_bytes    # trained weights and AdamW moments (torch AdamW keeps state in the param dtype)
    if fam.startswith("deepspeed"):
        # LoRA is refused with DeepSpeed (rules.plan_violations); these are full fine-tuning's states.
        return _deepspeed_states(model, plan, workload, psi, fam)
    if workload.lora:
        return _lora_states(model, plan, workload, stage, psi, fam)
    g = m  # gradient/reduce dtype: fp32 (MixedPrecisionPolicy reduce_dtype, or fp32 compute), bf16 for pure bf16
    opt = 2 * m * psi
    if fam in ("single", "ddp"):
        # No FSDP: bf16 autocast (fp32 masters only) keeps a cast of every matmul weight until the
        # autocast region (all micro-batches of the step) exits.
        cache = 2.0 * matmul_weights(model, plan, stage) if (m == FP32 and c == 2) else 0.0
        comm = g * psi if fam == "ddp" else 0.0  # DDP buckets: a second copy of the gradients
        return ModelStateBytes(m * psi + cache, g * psi, opt, 0.0, comm, fam, psi)
    # FSDP2 (fully_shard / replicate): units are each decoder layer and the stage root
    # (embedding / final norm / lm_head). Unsharded parameters are separate all-gather outputs
    # in the compute dtype, even for replicate's one-rank "gather".
    d = plan.dp_shard if fam != "replicate" else 1
    layer = model.layer_params / plan.tp
    root = psi - stage_layers(model, plan) * layer
    unit = max(layer, root)
    inflight_grad = (c + g) * unit  # one unit's compute-dtype grads + its reduce-dtype reduce-scatter input
    if fam == "fsdp_zero3":
        # reshard_after_forward=True: two blocks gathered (current + prefetch); the root is not
        # resharded after forward, so it stays gathered until its own backward ends (last), and
        # the lm_head's compute-dtype gradient waits for that reduction while the layers run
        # backward. At the end of backward the root is resharded and its gradients reduced.
        gathered = min(2, stage_layers(model, plan)) * c * layer
        head = model.vocab_size * model.hidden_size / plan.tp if stage == plan.pp - 1 else 0.0
        return ModelStateBytes(m * psi / d + c * root, g * psi / d, opt / d, gathered + inflight_grad, 0.0, fam, psi,
                               backward_buffers=gathered + (c + g) * layer + c * head,
                               end_buffers=(c + g) * root, freed_by_end=c * root)
    # zero 1/2 (reshard_after_forward=False), replicate, and any FSDP under pipeline parallel
    # (pipelining turns reshard-after-backward off until the last micro-batch): the whole
    # stage's unsharded compute copy stays resident through forward and backward.
    accumulates = fam in ("fsdp_pp", "replicate") or (fam == "fsdp_zero1" and plan.grad_accum > 1)
    # Without gradient sync (zero 1 before the last micro-batch; every pipelined backward) FSDP2
    # accumulates unsharded gradients in the reduce dtype; the shards replace them unit by unit.
    grads = g * psi if accumulates else g * psi / d
    return ModelStateBytes(m * psi / d + c * psi, grads, opt / d, inflight_grad, 0.0, fam, psi)


def _lora_states(model: ModelSpec, plan: ParallelPlan, workload: Workload, stage: int, psi: float,
                 fam: str) -> ModelStateBytes:
    """LoRA on the torch backend: the frozen base in the compute dtype, sharded by FSDP2 over
    dp_shard as full fine-tuning's masters are, with no gradients and no optimizer state; its
    unsharded compute copies exactly as full fine-tuning's (kept from forward to backward at ZeRO
    1/2, under replicate and under pipelining; only the root kept at ZeRO-3). The adapters follow
    full fine-tuning's rules for the trained parameters: master dtype weights, gradients and AdamW
    moments (16 B/param with adamw), compute-dtype copies, unit gradients in flight."""
    c, m = workload.compute_bytes, workload.master_bytes
    g = m
    a = stage_adapter_params(model, plan, workload)
    nl = stage_layers(model, plan)
    a_layer = a / nl if nl else 0.0
    opt = 2 * m * a
    if fam in ("single", "ddp"):
        # The base is already in the compute dtype (autocast casts nothing); fp32 adapters under
        # bf16 autocast keep their bf16 casts for the step. DDP buckets only trained gradients.
        cache = 2.0 * a if (m == FP32 and c == 2) else 0.0
        comm = g * a if fam == "ddp" else 0.0
        return ModelStateBytes(c * psi + m * a + cache, g * a, opt, 0.0, comm, fam, psi,
                               frozen=c * psi, adapters_local=a)
    d = plan.dp_shard if fam != "replicate" else 1
    layer = model.layer_params / plan.tp
    root = psi - nl * layer
    # one layer's adapter grads + their reduce-scatter input (the root trains nothing)
    inflight_grad = (c + g) * a_layer
    if fam == "fsdp_zero3":
        gathered = min(2, nl) * c * (layer + a_layer)
        frozen = c * psi / d + c * root
        return ModelStateBytes(frozen + m * a / d, g * a / d, opt / d, gathered + inflight_grad, 0.0, fam, psi,
                               backward_buffers=gathered + inflight_grad, end_buffers=0.0, freed_by_end=c * root,
                               frozen=frozen, adapters_local=a)
    accumulates = fam in ("fsdp_pp", "replicate") or (fam == "fsdp_zero1" and plan.grad_accum > 1)
    grads = g * a if accumulates else g * a / d
    frozen = c * psi / d + c * psi
    return ModelStateBytes(frozen + m * a / d + c * a, grads, opt / d, inflight_grad, 0.0, fam, psi,
                           frozen=frozen, adapters_local=a)


def _deepspeed_states(model: ModelSpec, plan: ParallelPlan, workload: Workload, psi: float,
                      fam: str) -> ModelStateBytes:
    # DeepSpeed holds the module in its compute dtype (bf16 mode) and keeps its own fp32 master
    # partition and fp32 AdamW moments over the partition (also for adamw_bf16: DeepSpeed's
    # master dtype stays fp32 unless bf16_master_weights_and_grads, which the engine does not set).
    c = workload.compute_bytes
    z = int(fam[-1])
    d = plan.dp if plan.zero_stage >= 1 else 1
    off = plan.offload  # optimizer offload: fp32 master, moments and fp32 grad partition on the host
    params = c * psi / (d if z == 3 else 1) + (0.0 if off else FP32 * psi / d)
    if z == 1:
        grads = c * psi  # module-dtype .grad accumulates unpartitioned until the boundary
    else:
        grads = 0.0 if off else c * psi / d  # partitioned gradient buffer (host with offload)
    if not off:  # the fp32 gradient partition step() builds for the optimizer
        grads += FP32 * (min(psi / d, DS_SUB_GROUP) if z == 3 else psi / d)
    optimizer = 0.0 if off else 2 * FP32 * psi / d
    buffers = c * min(DS_MAX_LIVE, psi) if z == 3 else 0.0  # ZeRO-3 parameters gathered at the fwd/bwd turn
    # The reduce bucket (contiguous_gradients) is filled to at most all the gradients; offloaded
    # ZeRO-1/2 also stage one parameter's gradient on the device.
    comm = c * min(DS_REDUCE_BUCKET, psi)
    if off and z < 3:
        comm += c * max(model.vocab_size * model.hidden_size, model.hidden_size * model.intermediate_size)
    return ModelStateBytes(params, grads, optimizer, buffers, comm, fam, psi)


def model_state_peak(model: ModelSpec, plan: ParallelPlan, workload: Workload) -> float:
    """Largest end-of-backward model-state bytes over the first and last pipeline stage: a lower
    bound of the peak (the search rejects layouts whose model states alone cannot fit)."""
    return max(model_state_bytes(model, plan, workload, s).end_total for s in {0, plan.pp - 1})


def memory_breakdown(model: ModelSpec, cluster: ClusterSpec, workload: Workload,
                     plan: ParallelPlan) -> MemoryBreakdown:
    """Memory of the worst pipeline stage (first and last are the candidates)."""
    # max keeps the first of equal totals: stage 0, as the loop this replaces did
    return max((stage_memory(model, cluster, workload, plan, stage) for stage in sorted({0, plan.pp - 1})),
               key=lambda mb: mb.total)


def vocab_parallel(model: ModelSpec, plan: ParallelPlan) -> bool:
    """Whether the engine vocab-shards the last stage's logits over tp (loss parallel)."""
    return plan.backend == "torch" and plan.tp > 1 and model.vocab_size % plan.tp == 0


def grads_live_in_forward(plan: ParallelPlan) -> bool:
    """Whether gradients exist while a micro-batch's forward and loss run: the optimizer step ends
    with zero_grad(set_to_none), so only a step of several micro-batches (gradient accumulation,
    or a pipeline schedule) carries gradients from one micro-batch into the next one's forward."""
    return plan.grad_accum > 1 or plan.pp > 1


def stage_memory(model: ModelSpec, cluster: ClusterSpec, workload: Workload, plan: ParallelPlan,
                 stage: int) -> MemoryBreakdown:
    """Predicted peak bytes of one device of pipeline stage `stage`, by term, at the phase of the
    step (PHASES) where their sum is highest."""
    hw = cluster.hardware
    st = model_state_bytes(model, plan, workload, stage)
    c = workload.compute_bytes
    s, b = workload.seq_len, plan.micro_batch_size
    sp = plan.sequence_parallel
    r, targets = workload.lora_rank, workload.lora_targets
    per_layer = (layer_activation_bytes(model, s, b, plan.tp, plan.recompute, sp, c)
                 + lora_layer_activation_bytes(model, s, b, plan.tp, plan.recompute, r, targets, sp, c))
    # the layer being (re)computed
    working = (layer_activation_bytes(model, s, b, plan.tp, "none", sp, c)
               + lora_layer_activation_bytes(model, s, b, plan.tp, "none", r, targets, sp, c))
    saved = per_layer * stage_layers(model, plan) * inflight_microbatches(plan, stage) * hw.activation_scale
    working *= hw.activation_scale
    # The documents mask's bytes are exact (not scaled): masks held + the per-layer copies saved
    # for backward, or those of the layer being (re)computed.
    mask_held, mask_saved, mask_working = attention_mask_bytes(workload, plan, model, stage)
    saved += mask_held + mask_saved
    working += mask_working
    last = stage == plan.pp - 1
    loss = 0.0
    if last:
        vp = vocab_parallel(model, plan)
        vocab = model.vocab_size / (plan.tp if vp else 1)
        loss = (logit_bytes(vp) * s * b * vocab
                + head_bytes(model, s, b, plan.tp, sp, c)) * hw.activation_scale
    comm = st.comm
    if plan.pp > 1:  # pipeline send/recv buffers: activations and their grads, both directions
        comm += 4 * c * s * b * model.hidden_size / plan.tp
    if st.family.startswith("deepspeed"):
        # DeepSpeed's buffers are not dry-run checked: every term is taken as live at once.
        phases = {"backward": (0.0, st.grads, st.buffers, saved + working, loss)}
    else:
        early_grads = st.grads if grads_live_in_forward(plan) else 0.0
        in_backward = st.buffers if st.backward_buffers is None else st.backward_buffers
        at_end = st.buffers if st.end_buffers is None else st.end_buffers
        phases = {
            # FSDP's gathered units are counted in params (the root) or are freed at this point.
            "loss": (0.0, early_grads, 0.0, saved, loss),
            "backward": (0.0, early_grads, in_backward, saved + working, 0.0),
            "end of backward": (-st.freed_by_end, st.grads, at_end, 0.0, 0.0),
        }
    if not last:
        phases.pop("loss", None)
    phase = max(phases, key=lambda k: sum(phases[k]))
    freed, grads, buffers, acts, logits = phases[phase]
    frag = hw.fragmentation * (acts + logits + buffers)
    mask = (mask_held + mask_saved + (mask_working if phase == "backward" else 0.0)) if acts else 0.0
    frozen = st.frozen + freed if workload.lora else 0.0
    adapters = (st.params + freed - frozen + grads + st.optimizer) if workload.lora else 0.0
    return MemoryBreakdown(st.params + freed, grads, st.optimizer, buffers, acts, logits, comm,
                           hw.runtime_reserved_bytes, frag, stage, st.params_local, st.family, phase,
                           frozen, adapters, st.adapters_local, mask)


def memory_limit(cluster: ClusterSpec, workload: Workload) -> float:
    """Usable bytes per device after the user's headroom fraction."""
    return cluster.hardware.memory_bytes * (1.0 - workload.constraints.headroom)
