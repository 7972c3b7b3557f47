"""Model-state bytes per engine family and precision, against hand-computed values (docs/planner.md,
"Memory model"). A made-up Llama-class model keeps the arithmetic readable:

    h=64, I=128, 4 layers, 4 heads / 2 kv heads (kv width 32), vocab 1000, untied head
    LAYER = q,o 2*64*64 + k,v 2*64*32 + gate,up,down 3*64*128 + two norms 2*64 = 36_992
    E     = vocab * h = 64_000 (embedding; the lm_head has as many)
    PSI   = 4*LAYER + E (embedding) + h (final norm) + E (lm_head) = 276_032   (pp=1, tp=1)
    ROOT  = the FSDP root unit (embedding, final norm, lm_head) = PSI - 4*LAYER = 128_064
    MM    = what bf16 autocast casts: linear weights 4*(LAYER - 2h) + lm_head E = 211_456

Precision: optimizer adamw = fp32 master weights and moments (4 B), adamw_bf16 = pure bf16 (2 B);
compute bf16 (2 B) or fp32 (4 B). Gradients reduce in fp32 with fp32 masters.
"""
from dataclasses import replace

import pytest

from raytune_llama.planner.cluster import ClusterSpec
from raytune_llama.planner.errors import PlanError
from raytune_llama.planner.hardware import load_hardware
from raytune_llama.planner.memory_model import (layer_activation_bytes, logit_bytes, memory_breakdown,
                                                model_state_bytes, model_state_peak)
from raytune_llama.planner.model_spec import ModelSpec, load_model
from raytune_llama.planner.plan import ParallelPlan
from raytune_llama.planner.search import MAX_MBS, divisors, family_floor, search
from raytune_llama.planner.workload import make_workload

TOY = ModelSpec(name="toy", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=4,
                num_heads=4, num_kv_heads=2)
H = 64
LAYER = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
E = 1000 * 64
PSI = 4 * LAYER + E + H + E
ROOT = E + H + E
MM = 4 * (LAYER - 2 * H) + E


def _states(plan, optimizer="adamw", compute="bf16", stage=0, model=TOY):
    wl = make_workload(64, 128, optimizer=optimizer, compute_dtype=compute)
    s = model_state_bytes(model, plan, wl, stage)
    return s.family, (s.params, s.grads, s.optimizer, s.buffers, s.comm)


def test_toy_shape_is_what_the_docstring_says():
    assert (LAYER, PSI, ROOT, MM) == (36_992, 276_032, 128_064, 211_456)
    assert TOY.layer_params == LAYER and TOY.n_params == PSI


# --- torch backend, fp32 masters, bf16 compute -------------------------------------------------

def test_ddp_fp32_weights_grads_bucket_copy_moments_and_autocast_cache():
    fam, got = _states(ParallelPlan(dp_replicate=4, grad_accum=16))
    assert fam == "ddp"
    # params fp32 4*PSI + autocast bf16 casts 2*MM; grads fp32 4*PSI; AdamW moments 8*PSI;
    # DDP buckets (no gradient_as_bucket_view) a second fp32 copy of the grads 4*PSI.
    assert got == (4 * PSI + 2 * MM, 4 * PSI, 8 * PSI, 0, 4 * PSI)


def test_single_device_group_tp_only():
    fam, got = _states(ParallelPlan(tp=2, sequence_parallel=True, grad_accum=64))
    assert fam == "single"
    psi = PSI / 2
    assert got == (4 * psi + 2 * MM / 2, 4 * psi, 8 * psi, 0, 0)  # 16 B/param + autocast cache


def test_replicate_with_tp():
    fam, got = _states(ParallelPlan(dp_replicate=2, tp=2, sequence_parallel=True, grad_accum=32))
    assert fam == "replicate"
    psi, layer, root = PSI / 2, LAYER / 2, ROOT / 2
    # fp32 params 4 + the unsharded bf16 copy FSDP2 keeps from forward to backward 2 (no autocast);
    # fp32 grads 4; moments 8; in flight: one unit's bf16 grads + fp32 all-reduce input (2+4) x unit.
    assert got == (4 * psi + 2 * psi, 4 * psi, 8 * psi, (2 + 4) * max(layer, root), 0)


@pytest.mark.parametrize("ga", [8, 1])
def test_fsdp_zero1_accumulates_unsharded_fp32_grads_unless_one_micro_batch(ga):
    fam, got = _states(ParallelPlan(dp_shard=4, zero_stage=1, grad_accum=ga, micro_batch_size=16 // ga))
    assert fam == "fsdp_zero1"
    d = 4
    # sharded fp32 params 4/d + resident bf16 unsharded copy 2 (reshard_after_forward=False);
    # grads: gradient sync deferred to the last micro-batch -> unsharded fp32 accumulators 4
    # (ga > 1), else reduce-scattered at once 4/d; moments 8/d; one unit in flight (2+4) x ROOT.
    grads = 4 * PSI if ga > 1 else 4 * PSI / d
    assert got == (4 * PSI / d + 2 * PSI, grads, 8 * PSI / d, 6 * ROOT, 0)


def test_fsdp_zero2():
    fam, got = _states(ParallelPlan(dp_shard=4, zero_stage=2, grad_accum=8, micro_batch_size=2))
    assert fam == "fsdp_zero2"
    assert got == (4 * PSI / 4 + 2 * PSI, 4 * PSI / 4, 8 * PSI / 4, 6 * ROOT, 0)


def test_fsdp_zero3():
    fam, got = _states(ParallelPlan(dp_shard=4, zero_stage=3, grad_accum=8, micro_batch_size=2))
    assert fam == "fsdp_zero3"
    # params 4/d + the root's bf16 copy (not resharded after forward) 2 x ROOT; in flight: two
    # gathered bf16 blocks 2 x 2 x LAYER + one unit's bf16 grads and fp32 reduce-scatter input 6 x ROOT.
    assert got == (PSI + 2 * ROOT, PSI, 2 * PSI, 2 * 2 * LAYER + 6 * ROOT, 0)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_fsdp_under_pipeline_keeps_params_unsharded_and_grads_accumulating(zero):
    plan = ParallelPlan(dp_shard=2, zero_stage=zero, pp=2, grad_accum=16)
    d = 2
    # Stage 0: layers 0-1 + embedding; stage 1: layers 2-3 + final norm + lm_head.
    for stage, psi, root in ((0, 2 * LAYER + E, E), (1, 2 * LAYER + H + E, H + E)):
        fam, got = _states(plan, stage=stage)
        assert fam == "fsdp_pp"
        # pipelining runs every backward without gradient sync or reshard-after-backward:
        # unsharded bf16 params 2 and unsharded fp32 grads 4 for the whole stage, whatever the stage.
        assert got == (4 * psi / d + 2 * psi, 4 * psi, 8 * psi / d, 6 * max(LAYER, root), 0)


# --- DeepSpeed (bf16 module, fp32 master partition + moments) -----------------------------------

@pytest.mark.parametrize("zero,offload,expect", [
    # params: bf16 module 2 (2/d at ZeRO-3) + fp32 master partition 4/d (host with offload);
    # grads: ZeRO-1 bf16 .grad 2, ZeRO-2/3 bf16 partition 2/d (host with offload),
    #        + the fp32 partition step() builds 4/d (host with offload);
    # optimizer: fp32 moments 8/d (host with offload); buffers: ZeRO-3 gathered params
    # 2 x min(1e9, PSI); comm: reduce bucket 2 x min(5e8, PSI) + offloaded ZeRO-1/2 stage one
    # parameter's grad on the device, 2 x largest parameter (E).
    (1, False, (2 * PSI + PSI, 2 * PSI + PSI, 2 * PSI, 0, 2 * PSI)),
    (1, True, (2 * PSI, 2 * PSI, 0, 0, 2 * PSI + 2 * E)),
    (2, False, (2 * PSI + PSI, 2 * PSI / 4 + PSI, 2 * PSI, 0, 2 * PSI)),
    (2, True, (2 * PSI, 0, 0, 0, 2 * PSI + 2 * E)),
    (3, False, (2 * PSI / 4 + PSI, 2 * PSI / 4 + PSI, 2 * PSI, 2 * PSI, 2 * PSI)),
    (3, True, (2 * PSI / 4, 0, 0, 2 * PSI, 2 * PSI)),
])
def test_deepspeed_zero_stages(zero, offload, expect):
    plan = ParallelPlan(dp_shard=4, zero_stage=zero, offload=offload, backend="deepspeed", grad_accum=16)
    fam, got = _states(plan)
    assert fam == f"deepspeed_zero{zero}"
    assert got == pytest.approx(expect)


def test_deepspeed_buckets_are_capped_at_their_configured_sizes():
    m70 = load_model("llama3-70b")
    plan = ParallelPlan(dp_shard=64, zero_stage=3, backend="deepspeed", grad_accum=8)
    _, (_, grads, _, buffers, comm) = _states(plan, model=m70)
    psi = m70.n_params
    assert comm == 2 * 5e8  # reduce_bucket_size elements in bf16
    assert buffers == 2 * 1e9  # stage3_max_live_parameters elements in bf16
    assert grads == pytest.approx(2 * psi / 64 + 4 * min(psi / 64, 1e9))  # fp32 step partition per 1e9 sub-group


# --- precision variants -------------------------------------------------------------------------

def test_master_bf16_is_8_bytes_per_param_plus_the_family_copies():
    fam, got = _states(ParallelPlan(tp=2, sequence_parallel=True, grad_accum=64), optimizer="adamw_bf16")
    psi = PSI / 2
    assert fam == "single" and got == (2 * psi, 2 * psi, 4 * psi, 0, 0)  # no autocast cache
    fam, got = _states(ParallelPlan(dp_replicate=4, grad_accum=16), optimizer="adamw_bf16")
    assert fam == "ddp" and got == (2 * PSI, 2 * PSI, 4 * PSI, 0, 2 * PSI)  # + bf16 bucket copy
    fam, got = _states(ParallelPlan(dp_shard=4, zero_stage=2, grad_accum=8, micro_batch_size=2),
                       optimizer="adamw_bf16")
    # bf16 shards 2/d, the unsharded bf16 copy 2, bf16 grads 2/d, bf16 moments 4/d; in flight (2+2) x ROOT.
    assert fam == "fsdp_zero2" and got == (2 * PSI / 4 + 2 * PSI, 2 * PSI / 4, 4 * PSI / 4, 4 * ROOT, 0)


def test_deepspeed_keeps_fp32_master_and_moments_under_adamw_bf16():
    plan = ParallelPlan(dp_shard=4, zero_stage=2, backend="deepspeed", grad_accum=16)
    assert _states(plan, optimizer="adamw_bf16") == _states(plan)


def test_compute_fp32_has_no_bf16_copies():
    fam, got = _states(ParallelPlan(dp_replicate=4, grad_accum=16), compute="fp32")
    assert fam == "ddp" and got == (4 * PSI, 4 * PSI, 8 * PSI, 0, 4 * PSI)  # no autocast cache
    fam, got = _states(ParallelPlan(dp_shard=4, zero_stage=3, grad_accum=8, micro_batch_size=2), compute="fp32")
    # FSDP gathers fp32: root copy 4 x ROOT, two fp32 blocks, one unit's fp32 grads + fp32 input.
    assert fam == "fsdp_zero3" and got == (PSI + 4 * ROOT, PSI, 2 * PSI, 2 * 4 * LAYER + 8 * ROOT, 0)
    fam, got = _states(ParallelPlan(dp_shard=4, zero_stage=2, backend="deepspeed", grad_accum=16), compute="fp32")
    # fp32 module 4 + master 4/d; fp32 grad partition 4/d + step partition 4/d; fp32 bucket.
    assert fam == "deepspeed_zero2" and got == (4 * PSI + PSI, PSI + PSI, 2 * PSI, 0, 4 * PSI)


def test_activations_and_logits_use_the_compute_dtype():
    # The loss's peak is in its backward: fp32 log-probabilities and two fp32 gradients (plus a
    # third fp32 temporary in torch's vocab-parallel cross-entropy), whatever the compute dtype.
    assert (logit_bytes(False), logit_bytes(True)) == (4 + 4 + 4, 4 + 4 + 4 + 4)
    s, b = 128, 2
    lse = 4.0 * s * b * TOY.num_heads  # fp32 logsumexp in either dtype
    for mode in ("none", "selective", "full"):
        bf16 = layer_activation_bytes(TOY, s, b, 1, mode)
        fp32 = layer_activation_bytes(TOY, s, b, 1, mode, dtype_bytes=4)
        keep = 0.0 if mode == "full" else lse
        assert fp32 - keep == pytest.approx(2 * (bf16 - keep))
    cluster = ClusterSpec(1, 4, load_hardware("h100"))
    plan = ParallelPlan(dp_shard=4, zero_stage=3, micro_batch_size=2, grad_accum=1)
    m16 = memory_breakdown(TOY, cluster, make_workload(8, 128), plan)
    m32 = memory_breakdown(TOY, cluster, make_workload(8, 128, compute_dtype="fp32"), plan)
    # Plus the head: the final norm's fp32 input and its output in the compute dtype.
    head16, head32 = (4 + 2) * s * b * TOY.hidden_size, (4 + 4) * s * b * TOY.hidden_size
    assert m16.logits == 12 * s * b * TOY.vocab_size + head16 and m32.logits == 12 * s * b * TOY.vocab_size + head32
    assert m16.phase == m32.phase == "loss"


def test_breakdown_adds_exactly_the_model_states():
    cluster = ClusterSpec(1, 4, load_hardware("h100"))
    wl = make_workload(64, 128)
    plan = ParallelPlan(dp_shard=4, zero_stage=3, micro_batch_size=2, grad_accum=8)
    mem = memory_breakdown(TOY, cluster, wl, plan)
    st = model_state_bytes(TOY, plan, wl, 0)
    # Gradient accumulation: the sharded gradients are live in every phase; the gathered units
    # and the in-flight reduction only once backward runs.
    assert (mem.params, mem.grads, mem.optimizer, mem.comm_buffers) == (st.params, st.grads, st.optimizer, st.comm)
    assert mem.fsdp_buffers == (0.0 if mem.phase == "loss" else st.buffers)
    assert mem.state_family == "fsdp_zero3"


# --- the search prunes with the same function ---------------------------------------------------

def _tight_cluster(limit_bytes):
    hw = replace(load_hardware("h100"), memory_bytes=limit_bytes, runtime_reserved_bytes=0.0, fragmentation=0.0)
    return ClusterSpec(1, 4, hw)


def test_family_floor_rejects_on_model_states_first():
    wl = make_workload(64, 128, headroom=0.0)
    base = ParallelPlan(dp_shard=4, zero_stage=2, micro_batch_size=1, grad_accum=16, recompute="full")
    states = model_state_peak(TOY, base, wl)
    mbs = [b for b in divisors(16) if b <= MAX_MBS]
    fits, _, mem, n = family_floor(TOY, _tight_cluster(states - 1), wl, base, mbs, states - 1)
    assert not fits and n == 1 and mem.total > states - 1
    fits, _, _, _ = family_floor(TOY, _tight_cluster(states * 4), wl, base, mbs, states * 4)
    assert fits


def test_zero1_family_survives_through_its_grad_accum_1_member():
    # Room for ZeRO-1 with sharded grads (grad_accum 1) but not for its unsharded accumulators
    # (short sequences: the activations of micro-batch 4 cost less than 4*PSI - 4*PSI/4 of grads).
    wl = make_workload(16, 8, headroom=0.0)
    ga4 = ParallelPlan(dp_shard=4, zero_stage=1, micro_batch_size=1, grad_accum=4, recompute="full")
    ga1 = replace(ga4, micro_batch_size=4, grad_accum=1)
    cluster = ClusterSpec(1, 4, replace(load_hardware("h100"), runtime_reserved_bytes=0.0, fragmentation=0.0))
    need_ga1 = memory_breakdown(TOY, cluster, wl, ga1).total
    assert memory_breakdown(TOY, cluster, wl, ga4).total > need_ga1
    tight = _tight_cluster(need_ga1 * 1.001)
    fits, plan, _, _ = family_floor(TOY, tight, wl, ga4, [1, 2, 4], need_ga1 * 1.001)
    assert fits and plan.grad_accum == 1
    found = [c.plan for c in search(TOY, tight, wl).feasible
             if (c.plan.dp_shard, c.plan.zero_stage, c.plan.tp, c.plan.pp, c.plan.backend) == (4, 1, 1, 1, "torch")]
    assert found and all(p.grad_accum == 1 for p in found)


# --- workload validation ------------------------------------------------------------------------

def test_compute_dtype_is_validated_with_the_flag_named():
    assert make_workload(8, 128, compute_dtype="float32").compute_dtype == "fp32"
    with pytest.raises(PlanError) as exc:
        make_workload(8, 128, compute_dtype="fp16")
    assert exc.value.field == "compute_dtype" and "--compute-dtype" in exc.value.fix
    with pytest.raises(PlanError) as exc:
        make_workload(8, 128, optimizer="adamw_bf16", compute_dtype="fp32")
    assert exc.value.field == "compute_dtype" and "--optimizer adamw" in exc.value.fix
