"""What a ParallelPlan means (wrapper, sharding, load, checkpoint format) is decided by the
plan alone, and its legality by one rule set that the planner and the engine share."""

import pytest
from transformers import LlamaConfig

from raytune_llama.engine.parallel.plan_check import check_plan
from raytune_llama.lora_settings import LoraSettings
from raytune_llama.planner.api import estimate, plan
from raytune_llama.planner.model_spec import from_hf_config
from raytune_llama.planner.plan import ParallelPlan
from raytune_llama.planner.rules import STRUCTURAL, layout_violations
from raytune_llama.planner.search import search
from raytune_llama.planner.cluster import as_cluster
from raytune_llama.planner.workload import as_workload


@pytest.mark.parametrize("layout, wrapper, shards, loads_sharded, fmt, autocasts, sync_once", [
    (dict(), "none", False, True, "full", True, False),
    (dict(dp_replicate=4), "ddp", False, False, "full", True, True),
    (dict(dp_replicate=2, tp=2), "fsdp_replicate", True, True, "sharded", False, True),
    (dict(dp_shard=4, zero_stage=1), "fsdp_shard", True, True, "sharded", False, True),
    (dict(dp_shard=4, zero_stage=2), "fsdp_shard", True, True, "sharded", False, False),
    (dict(dp_replicate=2, dp_shard=2, zero_stage=3), "fsdp_shard", True, True, "sharded", False, False),
    (dict(tp=2), "none", True, True, "sharded", True, False),
    (dict(dp_shard=4, zero_stage=2, backend="deepspeed"), "deepspeed", True, False, "full", False, False),
    (dict(dp_shard=4, zero_stage=3, backend="deepspeed"), "deepspeed", True, True, "full", False, False),
])
def test_plan_semantics(layout, wrapper, shards, loads_sharded, fmt, autocasts, sync_once):
    p = ParallelPlan(**layout)
    assert (p.data_parallel_wrapper, p.shards_model_state, p.loads_sharded, p.checkpoint_format, p.autocasts,
            p.syncs_gradients_once) == (wrapper, shards, loads_sharded, fmt, autocasts, sync_once)
    assert p.uses_fsdp == wrapper.startswith("fsdp")


# intermediate_size 40 is not divisible by 3 or 16; 12 heads are divisible by 3.
ODD = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=4,
                  num_attention_heads=12, num_key_value_heads=12)


def test_engine_refuses_what_the_planner_refuses_with_the_same_sentence():
    model = from_hf_config(ODD.to_dict())
    cases = [ParallelPlan(tp=3),                                           # FFN not divisible
             ParallelPlan(pp=2, grad_accum=1),                             # 1F1B with too few micro-batches
             ParallelPlan(pp=2, pp_schedule="interleaved_1f1b", virtual_stages=2, grad_accum=3),
             ParallelPlan(pp=8, grad_accum=8),                             # more stages than layers
             ParallelPlan(dp_shard=2, zero_stage=2, tp=2, backend="deepspeed")]
    for p in cases:
        broken = layout_violations(model, p)
        assert broken, p
        with pytest.raises(ValueError) as err:
            check_plan(p, ODD)
        assert str(err.value) == "; ".join(v.message for v in broken)
    assert {v.code for v in layout_violations(model, cases[0])} == {"tp_intermediate"}
    check_plan(ParallelPlan(pp=2, grad_accum=2), ODD)  # legal: no error
    with pytest.raises(ValueError, match=r"train\.lora\.dropout: 0\.05 with tensor parallel \(tp=2\)"):
        check_plan(ParallelPlan(tp=2), ODD, LoraSettings(dropout=0.05))


def test_every_layout_the_search_returns_passes_the_engine_check():
    """The planner never proposes a layout the engine would refuse (it once proposed TP degrees
    that did not divide the FFN size, and 1F1B with fewer micro-batches than stages)."""
    model = from_hf_config(ODD.to_dict())
    out = search(model, as_cluster({"hardware": "cpu", "nodes": 1, "devices_per_node": 12}),
                 as_workload({"global_batch": 12, "seq_len": 64}))
    assert out.feasible
    assert {c.plan.tp for c in out.feasible} <= {1, 2, 4}  # 3 and 6 do not divide the FFN (40)
    for cand in out.feasible:
        check_plan(cand.plan, ODD)
    assert "tp_intermediate" in out.rule_rejects


def test_estimate_skips_predictions_for_structural_violations_by_code():
    bad_batch = estimate("tiny-llama", {"hardware": "cpu", "nodes": 1, "devices_per_node": 4},
                         {"global_batch": 8, "seq_len": 64}, layout="dp_shard=4,zero_stage=3,grad_accum=4")
    assert not bad_batch.feasible and bad_batch.memory is None
    assert bad_batch.reasons == ["dp*micro_batch_size*grad_accum (16) must equal the global batch (8)"]
    legal_but_odd = estimate("tiny-llama", {"hardware": "cpu", "nodes": 1, "devices_per_node": 2},
                             {"global_batch": 8, "seq_len": 64}, layout="pp=2,pp_schedule=1f1b,grad_accum=1,"
                                                                        "micro_batch_size=8")
    assert not legal_but_odd.feasible and legal_but_odd.memory is not None  # predicted, then refused
    assert "pp_microbatches" not in STRUCTURAL


def test_planner_result_passes_engine_check_on_the_shipped_tiny_model():
    res = plan("tiny-llama", {"hardware": "cpu", "nodes": 1, "devices_per_node": 8},
               {"global_batch": 8, "seq_len": 128})
    from raytune_llama.presets import preset_config
    check_plan(res.plan, preset_config("tiny-llama"))
