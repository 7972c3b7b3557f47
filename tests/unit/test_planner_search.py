"""Search: rediscovers the known layout rules; errors are clear; the no-fit error names a cluster."""
import pytest

from raytune_llama.planner.api import estimate, plan
from raytune_llama.planner.errors import NoFeasiblePlanError, PlanError
from raytune_llama.planner.rules import plan_violations


def _plan(model, hw, nodes, gb, s, **kw):
    return plan(model, {"hardware": hw, "nodes": nodes}, {"global_batch": gb, "seq_len": s, **kw})


@pytest.fixture(scope="module")
def mi250_70b():
    return _plan("llama3-70b", "mi250", 8, 512, 1024)


def test_70b_on_64_mi250_tp_on_gcd_pair_and_states_spread_across_nodes(mi250_70b):
    p = mi250_70b.plan
    assert p.tp <= 2  # TP never leaves one card's GCD pair on MI250
    # The states do not fit in one node: weights split over more than 8 devices (TP x PP, and the
    # dp_shard axis too when ZeRO-3 shards them).
    assert p.tp * p.pp * (p.dp_shard if p.zero_stage == 3 else 1) > 8
    assert p.global_batch() == 512 and p.world_size == 64
    assert mi250_70b.best.memory.total <= mi250_70b.limit
    assert mi250_70b.to_dict()["alternatives"] and len(mi250_70b.alternatives) == 10


def test_tp_never_across_nodes(mi250_70b):
    assert all(a.plan.tp <= 8 for a in mi250_70b.alternatives)
    assert any("cross nodes" in r["reason"] for r in mi250_70b.rejected)


def test_8b_on_8_devices_is_sharded_data_parallel_alone():
    for hw in ("h100", "mi250"):
        p = _plan("llama3-8b", hw, 1, 64, 4096).plan
        assert (p.tp, p.pp, p.dp_shard) == (1, 1, 8) and p.zero_stage >= 2


def test_405b_uses_tp8_inside_node_and_pipeline():
    p = _plan("llama3.1-405b", "h100", 2048, 2048, 8192).plan
    assert p.tp == 8 and p.pp > 1


def test_constraints_are_respected():
    r = _plan("llama3-70b", "mi250", 8, 512, 1024, tp=2, pp=8, allow_offload=False)
    assert (r.plan.tp, r.plan.pp, r.plan.offload) == (2, 8, False)
    small = _plan("llama3-70b", "mi250", 1, 64, 1024)  # one node: needs CPU offload
    assert small.plan.offload and small.plan.backend == "deepspeed"


def test_no_fit_names_smallest_cluster():
    with pytest.raises(NoFeasiblePlanError) as exc:
        _plan("llama3.1-405b", "mi250", 1, 512, 1024, allow_offload=False)
    assert exc.value.smallest_nodes and exc.value.smallest_nodes > 1
    assert f"at least {exc.value.smallest_nodes} nodes" in str(exc.value)
    # ... and that cluster really fits.
    assert _plan("llama3.1-405b", "mi250", exc.value.smallest_nodes, 512, 1024, allow_offload=False)


@pytest.mark.parametrize("kw,field", [
    ({"seq_len": 0}, "seq_len"), ({"global_batch": -4}, "global_batch"), ({"headroom": 1.5}, "headroom"),
    ({"optimizer": "sgd"}, "optimizer"),
])
def test_invalid_workload_errors(kw, field):
    wl = {"global_batch": 64, "seq_len": 1024, **kw}
    with pytest.raises(PlanError) as exc:
        plan("llama3-8b", {"hardware": "h100", "nodes": 1}, wl)
    assert exc.value.field == field and "fix" in str(exc.value)


def test_estimate_reports_infeasible_layouts():
    e = estimate("llama3-70b", {"hardware": "mi250", "nodes": 8}, {"global_batch": 512, "seq_len": 1024},
                 layout="tp=16,pp=4")
    assert not e.feasible and any("cross nodes" in r for r in e.reasons)
    oom = estimate("llama3-70b", {"hardware": "mi250", "nodes": 8}, {"global_batch": 512, "seq_len": 1024},
                   layout="zero_stage=0,dp_replicate=64")
    assert not oom.feasible and "out of memory by" in oom.reasons[-1]
    # MoAI's layout: under pipelining FSDP2 keeps each stage's bf16 params unsharded and its fp32
    # gradients accumulating unsharded, 6 B/param of the ~8.8B-param stage, on top of the shards.
    moai = estimate("llama3-70b", {"hardware": "mi250", "nodes": 8}, {"global_batch": 512, "seq_len": 1024},
                    layout="dp_shard=8,pp=8,micro_batch_size=1,recompute=full")
    assert not moai.feasible and moai.plan.grad_accum == 64 and moai.time.mfu > 0
    assert "out of memory by" in moai.reasons[-1] and moai.memory.dominant == "grads"
    fsdp = estimate("llama3-70b", {"hardware": "mi250", "nodes": 8}, {"global_batch": 512, "seq_len": 1024},
                    layout="dp_shard=32,tp=2,zero_stage=3,micro_batch_size=16,recompute=full")
    assert fsdp.feasible, fsdp.reasons


def test_result_plans_are_legal(mi250_70b):
    from raytune_llama.planner.memory_model import memory_breakdown
    for c in [mi250_70b.best, *mi250_70b.alternatives]:
        assert plan_violations(mi250_70b.model, mi250_70b.cluster, mi250_70b.workload, c.plan) == []
        assert memory_breakdown(mi250_70b.model, mi250_70b.cluster, mi250_70b.workload, c.plan).total <= mi250_70b.limit
