"""The planner with LoRA (frozen base, trained adapters) and with the block-diagonal attention
mask of document packing: adapter counts, memory by category, what fits, the backend refusal,
backward time, the mask's bytes, the CLI and the run's workload (docs/planner.md, "LoRA and
document packing")."""
import json

import pytest

from raytune_llama.lora_settings import ALL_LINEAR
from raytune_llama.planner.api import estimate, plan
from raytune_llama.planner.cluster import make_cluster
from raytune_llama.planner.errors import NoFeasiblePlanError, PlanError
from raytune_llama.planner.memory_model import (attention_mask_bytes, inflight_microbatches, memory_breakdown,
                                                 model_state_bytes, stage_layers, stage_params)
from raytune_llama.planner.model_spec import load_model
from raytune_llama.planner.plan import ParallelPlan
from raytune_llama.planner.search import search
from raytune_llama.planner.time_model import group_bandwidth, layer_times, step_time
from raytune_llama.planner.workload import make_workload
from tests.unit.test_planner_cli import run_cli

M8 = load_model("llama3-8b")
M70 = load_model("llama3-70b")
MI250_8 = make_cluster("mi250", 1, 8)
CLI_70B = ["--model", "llama3-70b", "--hardware", "mi250", "--nodes", "1", "--devices-per-node", "8",
           "--seq-len", "1024", "--global-batch", "64"]


def _by_hand(h, heads, kv_heads, inter, layers, r, targets=ALL_LINEAR):
    kv = h // heads * kv_heads
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    # A [r, in] + B [out, r] per targeted W [out, in]
    return layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def test_adapter_count_is_exact():
    # Llama 3 8B: h 4096, 32 heads, 8 kv heads (kv width 1024), FFN 14336, 32 layers
    assert (M8.hidden_size, M8.num_heads, M8.num_kv_heads, M8.intermediate_size, M8.num_layers) == \
        (4096, 32, 8, 14336, 32)
    per_layer = 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336))
    assert M8.lora_params(16) == 32 * per_layer == 41_943_040 == _by_hand(4096, 32, 8, 14336, 32, 16)
    assert M8.lora_params(8, ("q_proj", "v_proj")) == 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    assert M8.lora_params(0) == 0
    assert M70.lora_params(16) == _by_hand(8192, 64, 8, 28672, 80, 16) == 207_093_760
    # Per TP rank: column-parallel W -> A replicated, B split; row-parallel W -> A split, B replicated.
    tp = 2
    q = 16 * (4096 + 4096 / tp)
    o = 16 * (4096 / tp + 4096)
    assert M8.lora_layer_params(16, ("q_proj", "o_proj"), tp) == q + o
    wl = make_workload(8, 128, lora_rank=16, lora_targets="v_proj, q_proj")
    assert wl.lora and wl.lora_targets == ("q_proj", "v_proj")  # canonical order


def _states(workload, plan, stage=0):
    return model_state_bytes(M8, plan, workload, stage)


def test_memory_by_category_lora_vs_full_zero3():
    plan = ParallelPlan(dp_shard=8, zero_stage=3, micro_batch_size=1, grad_accum=8, recompute="full")
    full, lora = make_workload(64, 4096), make_workload(64, 4096, lora_rank=16)
    psi = stage_params(M8, plan, 0)
    nl = stage_layers(M8, plan)
    root = psi - nl * M8.layer_params
    a = M8.lora_params(16)
    assert psi == M8.n_params and nl == 32
    st_full, st = _states(full, plan), _states(lora, plan)
    # frozen base: bf16, sharded over the 8 devices (the root stays gathered at ZeRO-3); adapters:
    # fp32 masters, grads and two AdamW moments, all sharded
    assert st.frozen == pytest.approx(2 * psi / 8 + 2 * root)
    assert st.params == pytest.approx(st.frozen + 4 * a / 8)
    assert st.grads == pytest.approx(4 * a / 8)
    assert st.optimizer == pytest.approx(8 * a / 8)
    assert st_full.optimizer == pytest.approx(8 * psi / 8) and st_full.grads == pytest.approx(4 * psi / 8)
    assert st_full.frozen == 0
    # two gathered bf16 blocks (base + adapters) and one layer's adapter grads in flight
    layer_a = a / 32
    assert st.buffers == pytest.approx(2 * 2 * (M8.layer_params + layer_a) + (2 + 4) * layer_a)
    assert st.end_buffers == 0  # the root trains nothing: no reduction at the end of backward

    mem_full = memory_breakdown(M8, MI250_8, full, plan)
    mem = memory_breakdown(M8, MI250_8, lora, plan)
    assert mem.phase == mem_full.phase == "loss"
    assert mem.optimizer == pytest.approx(8 * a / 8)              # no base optimizer state
    assert mem.grads == pytest.approx(4 * a / 8)                  # grad_accum 8: adapter grads live
    assert mem.frozen_base == pytest.approx(2 * psi / 8 + 2 * root)
    assert mem.adapters == pytest.approx(4 * a / 8 + 4 * a / 8 + 8 * a / 8)
    assert mem.adapter_params_local == pytest.approx(a)
    assert mem.optimizer < mem_full.optimizer / 100 and mem.total < mem_full.total
    # activations: full recompute saves only the layer inputs, as for full fine-tuning (the
    # adapters' [tokens, r] intermediates exist only inside the layer being recomputed)
    assert mem.activations == mem_full.activations


def test_memory_by_category_other_families():
    a = M8.lora_params(16)
    lora = make_workload(64, 4096, lora_rank=16)
    # ZeRO-1: the frozen base sharded plus its gathered bf16 copy kept from forward to backward
    z1 = ParallelPlan(dp_shard=8, zero_stage=1, micro_batch_size=1, grad_accum=8, recompute="full")
    psi = stage_params(M8, z1, 0)
    st = _states(lora, z1)
    assert st.frozen == pytest.approx(2 * psi / 8 + 2 * psi)
    assert st.grads == pytest.approx(4 * a)  # grad_accum > 1: unsharded adapter grads accumulate
    assert st.optimizer == pytest.approx(8 * a / 8)
    # DDP: the whole base in bf16 (autocast casts nothing), fp32 adapters (+ their bf16 casts),
    # buckets for the adapters' gradients only
    ddp = ParallelPlan(dp_replicate=8, micro_batch_size=1, grad_accum=8, recompute="full")
    st = _states(lora, ddp)
    assert st.family == "ddp" and st.frozen == pytest.approx(2 * psi)
    assert st.params == pytest.approx(2 * psi + 4 * a + 2 * a) and st.comm == pytest.approx(4 * a)
    # fp32 compute (CPU runs): the frozen base is fp32
    fp32 = make_workload(64, 4096, lora_rank=16, compute_dtype="fp32")
    assert _states(fp32, ddp).frozen == pytest.approx(4 * psi)
    # pipeline parallel is allowed with LoRA: each stage's base, unsharded adapter grads
    pp = ParallelPlan(dp_shard=2, zero_stage=1, pp=4, micro_batch_size=1, grad_accum=32, recompute="full")
    st = _states(lora, pp, 3)
    a_stage = stage_layers(M8, pp) * M8.lora_layer_params(16)
    assert st.family == "fsdp_pp" and st.grads == pytest.approx(4 * a_stage)
    assert st.frozen == pytest.approx(2 * stage_params(M8, pp, 3) / 2 + 2 * stage_params(M8, pp, 3))


def test_selective_saves_the_adapter_outputs():
    # Selective recompute saves every matmul output: each adapter's A output [tokens, r] and B
    # output [tokens, out] (column-parallel /tp; row-parallel on a sequence shard under SP).
    plan = ParallelPlan(dp_shard=4, zero_stage=3, tp=2, sequence_parallel=True, micro_batch_size=1,
                        grad_accum=16, recompute="selective")
    full = memory_breakdown(M8, MI250_8, make_workload(64, 2048), plan)
    lora = memory_breakdown(M8, MI250_8, make_workload(64, 2048, lora_rank=16, lora_targets=("q_proj", "o_proj")),
                            plan)
    sb = 2048
    per_layer = 2 * sb * 16 * 2 + 2 * sb * (4096 / 2 + 4096 / 2)
    scale = MI250_8.hardware.activation_scale
    assert lora.phase == full.phase == "loss"  # all 32 layers' saved activations, no working layer
    assert lora.activations - full.activations == pytest.approx(per_layer * 32 * scale)
    # without recompute only the A outputs are added (B's output is consumed by the scale-add)
    plan = ParallelPlan(dp_shard=4, zero_stage=3, tp=2, sequence_parallel=True, micro_batch_size=1,
                        grad_accum=16, recompute="none")
    full = memory_breakdown(M8, MI250_8, make_workload(64, 2048), plan)
    lora = memory_breakdown(M8, MI250_8, make_workload(64, 2048, lora_rank=16), plan)
    assert lora.phase == full.phase == "loss"
    assert lora.activations - full.activations == pytest.approx(2 * sb * 16 * 7 * 32 * scale)


def test_70b_lora_fits_on_one_node_where_full_fine_tuning_does_not():
    cluster = {"hardware": "mi250", "nodes": 1, "devices_per_node": 8}
    res = plan("llama3-70b", cluster, {"global_batch": 64, "seq_len": 1024, "lora_rank": 16})
    assert res.plan.backend == "torch" and not res.plan.offload and res.plan.world_size == 8
    assert res.best.memory.total <= res.limit
    assert res.best.memory.frozen_base > 0 and res.best.memory.optimizer < 2**30
    with pytest.raises(NoFeasiblePlanError) as err:  # full fine-tuning on the devices: 3 nodes at least
        plan("llama3-70b", cluster, {"global_batch": 64, "seq_len": 1024, "allow_offload": False})
    assert err.value.smallest_nodes == 3
    # only with DeepSpeed's CPU offload of the fp32 masters and moments (host memory unchecked)
    offloaded = plan("llama3-70b", cluster, {"global_batch": 64, "seq_len": 1024})
    assert offloaded.plan.offload and offloaded.plan.backend == "deepspeed"
    assert offloaded.best.time.step_time > 2 * res.best.time.step_time


def test_lora_never_picks_deepspeed():
    for model, gb in ((M8, 32), (M70, 64)):
        out = search(model, MI250_8, make_workload(gb, 1024, lora_rank=16))
        assert out.feasible and all(c.plan.backend == "torch" for c in out.feasible)
        assert all(p.backend == "torch" for p, _, _ in out.oom)
    with pytest.raises(PlanError) as err:
        make_workload(32, 1024, lora_rank=16, backend="deepspeed")
    assert "backend" in str(err.value) and "--backend torch" in err.value.fix
    est = estimate(M8, MI250_8, make_workload(32, 1024, lora_rank=16),
                   layout="dp_shard=8,zero_stage=2,micro_batch_size=1,recompute=full,backend=deepspeed")
    assert not est.feasible and est.memory is None and any("LoRA" in r for r in est.reasons)
    # pipeline parallel is allowed with LoRA
    res = plan(M8, MI250_8, make_workload(32, 1024, lora_rank=16, pp=4))
    assert res.plan.pp == 4 and res.plan.backend == "torch"


def test_backward_skips_the_frozen_weight_gradients():
    hw = MI250_8.hardware
    bw = group_bandwidth(MI250_8, 1)
    for recompute, full_ratio, lora_ratio in (("none", 3.0, 2.0), ("full", 4.0, 3.0)):
        full = layer_times(M8, hw, 4096, 2, 1, recompute, bw, False)
        lora = layer_times(M8, hw, 4096, 2, 1, recompute, bw, False, 16, ALL_LINEAR)
        assert full.gemm_fwd == lora.gemm_fwd > 0
        assert full.gemm_bwd == pytest.approx(2 * full.gemm_fwd) and lora.gemm_bwd == pytest.approx(lora.gemm_fwd)
        rec = lambda lt: lt.gemm_fwd if recompute == "full" else 0.0  # noqa: E731 - full recompute re-runs them
        # base GEMM time per step relative to the forward: 3x -> 2x, with full recompute 4x -> 3x
        assert (full.gemm_fwd + full.gemm_bwd + rec(full)) / full.gemm_fwd == pytest.approx(full_ratio)
        assert (lora.gemm_fwd + lora.gemm_bwd + rec(lora)) / lora.gemm_fwd == pytest.approx(lora_ratio)
        assert 0 < lora.adapter_fwd < lora.gemm_fwd / 5 and lora.adapter_bwd > lora.adapter_fwd
        assert full.bwd - lora.bwd == pytest.approx(full.gemm_fwd - lora.adapter_bwd)
    # a whole ZeRO-3 step: faster; FSDP still gathers the bf16 base twice per micro-batch, but
    # reduce-scatters only the adapters' gradients (3 gather-sized collectives -> 2)
    plan = ParallelPlan(dp_shard=8, zero_stage=3, micro_batch_size=2, grad_accum=4, recompute="full")
    t_full = step_time(M8, MI250_8, make_workload(64, 4096), plan)
    t_lora = step_time(M8, MI250_8, make_workload(64, 4096, lora_rank=16), plan)
    assert t_lora.step_time < t_full.step_time and t_lora.compute < t_full.compute
    assert t_lora.dp_comm_total / t_full.dp_comm_total == pytest.approx(2 / 3, rel=0.02)
    assert t_lora.optimizer < t_full.optimizer / 100
    # model FLOPs of a LoRA step: 4N + 6 N_adapters + 12 L d s per token (full: 6N + 12 L d s)
    attn = 12 * 32 * 4096 * 4096
    assert M8.model_flops_per_token(4096, 16) == 4 * M8.n_nonembedding + 6 * M8.lora_params(16) + attn
    assert M8.model_flops_per_token(4096) == 6 * M8.n_nonembedding + attn
    tokens = 64 * 4096
    assert t_lora.mfu == pytest.approx(M8.model_flops_per_token(4096, 16) * tokens
                                       / (t_lora.step_time * 8 * MI250_8.hardware.peak_flops))
    assert t_full.hfu / t_full.mfu == pytest.approx(4 / 3)
    fwd = M8.forward_flops_per_token(4096, 16)
    assert t_lora.hfu / t_lora.mfu == pytest.approx((M8.model_flops_per_token(4096, 16) + fwd)
                                                    / M8.model_flops_per_token(4096, 16))


def test_documents_mask_bytes():
    s, b = 4096, 2
    causal, docs = make_workload(64, s), make_workload(64, s, attention_mask="documents")
    h, kv = M8.hidden_size, M8.kv_dim
    for recompute in ("none", "selective", "full"):
        plan = ParallelPlan(dp_shard=8, zero_stage=3, micro_batch_size=b, grad_accum=4, recompute=recompute)
        assert attention_mask_bytes(causal, plan, M8, 0) == (0.0, 0.0, 0.0)
        held, saved, working = attention_mask_bytes(docs, plan, M8, 0)
        assert held == b * s * s  # bool [b, 1, s, s], one micro-batch in flight
        # per layer: SDPA's additive bf16 copy of the mask, and K/V repeated to every head
        per_layer = 2 * b * s * s + 2 * 2 * s * b * (h - kv)
        assert (saved, working) == ((per_layer * 32, 0.0) if recompute == "none" else (0.0, per_layer))
        m_causal = memory_breakdown(M8, MI250_8, causal, plan)
        m_docs = memory_breakdown(M8, MI250_8, docs, plan)
        assert m_causal.attention_mask == 0 and m_docs.attention_mask > 0
        assert m_docs.phase == m_causal.phase
        extra = held + saved + (working if m_docs.phase == "backward" else 0.0)
        assert m_docs.activations - m_causal.activations == pytest.approx(extra)
        assert m_docs.attention_mask == pytest.approx(extra)
        # time: attention keeps the causal kernel's FLOPs
        assert step_time(M8, MI250_8, docs, plan).step_time == step_time(M8, MI250_8, causal, plan).step_time
    # pipeline: one mask per in-flight micro-batch (and model chunk), as for activations
    for sched, v in (("1f1b", 1), ("interleaved_1f1b", 2)):
        plan = ParallelPlan(dp_shard=2, zero_stage=1, pp=4, pp_schedule=sched, virtual_stages=v, micro_batch_size=b,
                            grad_accum=16, recompute="full")
        held, _, _ = attention_mask_bytes(docs, plan, M8, 0)
        assert held == pytest.approx(b * s * s * inflight_microbatches(plan, 0) * v)
        assert held == pytest.approx(b * s * s * (4 if v == 1 else 2 * 3 + 4 + 1))
    # TP: the mask is not split (SDPA sees the full sequence); the repeated K/V are
    plan = ParallelPlan(dp_shard=4, zero_stage=3, tp=2, sequence_parallel=True, micro_batch_size=b, grad_accum=8,
                        recompute="full")
    assert attention_mask_bytes(docs, plan, M8, 0)[2] == 2 * b * s * s + 2 * 2 * s * b * (h - kv) / 2
    with pytest.raises(PlanError):
        make_workload(8, 128, attention_mask="sliding")


def test_cli_lora_and_packing_text():
    code, out, _ = run_cli(["plan", *CLI_70B, "--lora-rank", "16", "--packing", "documents"])
    assert code == 0
    assert "LoRA r=16 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj: 207.1M trainable" in out
    assert "attention: documents" in out
    assert "of which: frozen base" in out and "adapters + grads + optimizer" in out and "attention mask" in out
    assert "backend=deepspeed" not in out.split("rejected:")[0]
    code, out, err = run_cli(["plan", *CLI_70B])
    assert code == 0 and "LoRA" not in out and "frozen base" not in out and "attention mask" not in out
    code, out, _ = run_cli(["estimate", *CLI_70B, "--lora-rank", "8", "--lora-targets", "q_proj,v_proj",
                            "--layout", "tp=2,pp=4,v=4,micro_batch_size=2,recompute=none"])
    assert code == 0 and "LoRA r=8 on q_proj,v_proj" in out and "frozen base" in out
    code, _, err = run_cli(["plan", *CLI_70B, "--lora-rank", "16", "--lora-targets", "q_proj,lm_head"])
    assert code == 2 and "lora_targets" in err and "lm_head" in err
    code, _, err = run_cli(["plan", *CLI_70B, "--lora-rank", "16", "--backend", "deepspeed"])
    assert code == 2 and "--backend torch" in err


def test_cli_lora_and_packing_json():
    code, out, _ = run_cli(["plan", *CLI_70B, "--lora-rank", "16", "--packing", "documents", "--json"])
    d = json.loads(out)
    assert code == 0
    w = d["workload"]
    assert (w["lora_rank"], w["lora_targets"], w["lora_params"], w["attention_mask"]) == \
        (16, list(ALL_LINEAR), 207_093_760, "documents")
    assert w["trainable_params"] == 207_093_760
    assert d["plan"]["backend"] == "torch"
    mem = d["memory"]
    assert mem["lora"]["frozen_base"] > 0 and mem["lora"]["adapters"] > 0 and mem["attention_mask"] > 0
    assert mem["lora"]["frozen_base"] <= mem["breakdown"]["params"]
    assert mem["attention_mask"] <= mem["breakdown"]["activations"]
    code, out, _ = run_cli(["plan", *CLI_70B, "--no-offload", "--packing", "naive", "--json"])
    assert code == 2 and "error" in json.loads(out)  # full fine-tuning: nothing fits on 8 GCDs
    code, out, _ = run_cli(["plan", "--model", "llama3-8b", "--hardware", "mi250", "--seq-len", "1024",
                            "--global-batch", "32", "--packing", "none", "--json"])
    w = json.loads(out)["workload"]
    assert (w["lora_rank"], w["lora_targets"], w["attention_mask"]) == (0, [], "causal")
    assert w["trainable_params"] == M8.n_params and json.loads(out)["memory"]["lora"] is None


def test_run_workload_reads_train_lora_and_data_packing(tmp_path):
    from raytune_llama.config import load_config
    from raytune_llama.presets import preset_hf_config
    from raytune_llama.trainer.planning import make_run_plan, run_workload
    from tests.unit.test_config import TINY

    cfg = load_config(TINY, ["train.lora={r: 8, target_modules: [v_proj, q_proj]}", "data.packing=documents"])
    w = run_workload(cfg)
    assert (w["lora_rank"], w["lora_targets"], w["attention_mask"]) == (8, ("v_proj", "q_proj"), "documents")
    assert make_workload(**w).lora_targets == ("q_proj", "v_proj")
    w = run_workload(load_config(TINY, ["data.packing=naive"]))
    assert (w["lora_rank"], w["attention_mask"]) == (0, "causal")
    (tmp_path / "config.json").write_text(json.dumps(preset_hf_config("tiny-llama")))
    run = make_run_plan(cfg, str(tmp_path))
    spec = load_model(preset_hf_config("tiny-llama"))
    assert run.plan.backend == "torch"
    assert run.model_flops_per_token == spec.model_flops_per_token(cfg.data.seq_len, 8, ("q_proj", "v_proj"))
    assert run.model_flops_per_token < spec.model_flops_per_token(cfg.data.seq_len)
