"""calibrate(): latency/overhead knobs fitted from layouts that differ in collective count, bound
reporting, clear errors; collective-call counting and CPU ranks sharing a host's cores."""
from dataclasses import replace

import pytest

from raytune_llama.planner.api import estimate
from raytune_llama.planner.calibrate import calibrate
from raytune_llama.planner.errors import PlanError
from raytune_llama.planner.hardware import host_share, load_hardware, shared_view

TINY = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
SHARED = {"cores_per_node": 2, "cores_per_device": 1, "peak_flops": 50e9, "memory_bw": 14e9}
LAYOUTS = {"ddp2": "dp_replicate=2,micro_batch_size=4,grad_accum=1",
           "zero2": "dp_shard=2,zero_stage=2,micro_batch_size=2,grad_accum=2",
           "zero3": "dp_shard=2,zero_stage=3,micro_batch_size=2,grad_accum=2",
           "tp2": "tp=2,sequence_parallel=false,micro_batch_size=4,grad_accum=2",
           "tp2_sp": "tp=2,sequence_parallel=true,micro_batch_size=4,grad_accum=2",
           "pp2": "pp=2,micro_batch_size=2,grad_accum=4"}


def _est(layout, profile, dpn=2):
    return estimate(TINY, {"hardware": "cpu", "nodes": 1, "devices_per_node": dpn, "profile": profile},
                    {"seq_len": 128, "global_batch": 8, "headroom": 0.0}, layout=layout)


def _records(truth):
    return [{"model": TINY, "hardware": "cpu", "nodes": 1, "devices_per_node": 2, "seq_len": 128, "global_batch": 8,
             "layout": lay, "measured_step_time_s": _est(lay, truth).time.step_time} for lay in LAYOUTS.values()]


def test_calibrate_empty_records_names_field_and_fix():
    with pytest.raises(PlanError) as exc:
        calibrate([])
    assert exc.value.field == "records" and "non-empty list" in exc.value.fix
    assert "measured_step_time_s" in exc.value.fix
    with pytest.raises(PlanError, match=r"records\[0\].*missing field"):
        calibrate([{"model": TINY}])


def test_collective_calls_follow_the_layout():
    calls = {n: _est(lay, SHARED).time.collective_calls for n, lay in LAYOUTS.items()}
    assert calls["tp2_sp"] > calls["tp2"] > calls["zero3"] > calls["zero2"] > calls["ddp2"] >= 1
    assert calls["pp2"] > calls["ddp2"] - 2  # 2 p2p per micro-batch, no dp group
    # Latency is paid per call: raising it widens the gap between TP+SP and DDP.
    slow = dict(SHARED, collective_latency_s=5e-3)
    gap = [(_est(LAYOUTS["tp2_sp"], p).time.step_time - _est(LAYOUTS["ddp2"], p).time.step_time) for p in (SHARED, slow)]
    assert gap[1] - gap[0] == pytest.approx((calls["tp2_sp"] - calls["ddp2"]) * (5e-3 - 100e-6), rel=0.15)


def test_calibrate_fits_latency_when_records_differ_by_collective_count():
    truth = dict(SHARED, collective_latency_s=8e-3, layer_overhead_s=2e-3, efficiency={"matmul_max": 0.9})
    hw, rep = calibrate(_records(truth), profile=SHARED)
    assert hw.collective_latency_s == pytest.approx(8e-3, rel=0.25)
    assert rep["fitted"]["collective_latency_s"] == hw.collective_latency_s
    assert rep["step_time_error_pct_after"] < 10 and rep["step_time_error_pct_before"] > 3 * rep["step_time_error_pct_after"]
    assert rep["at_bound"] == {} and rep["warnings"] == []
    # The fitted profile ranks the layouts like the "measurements" (calibration is not a rescale).
    meas = [r["measured_step_time_s"] for r in rep["runs"]]
    pred = [r["predicted_after_s"] for r in rep["runs"]]
    assert sorted(range(len(meas)), key=meas.__getitem__) == sorted(range(len(pred)), key=pred.__getitem__)


def test_calibrate_says_when_a_fit_stops_at_a_bound():
    recs = _records(SHARED)
    for r in recs:
        r["measured_step_time_s"] *= 1e5
    _, rep = calibrate(recs, profile=SHARED)
    assert rep["at_bound"].get("efficiency.matmul_max") == "lower"
    assert any("efficiency.matmul_max" in w and "bound" in w for w in rep["warnings"])


def test_ranks_sharing_cores_slow_down_and_gpus_do_not():
    cpu = load_hardware("cpu", SHARED)
    assert host_share(cpu, 2) == 1.0 and host_share(cpu, 4) == 0.5
    view = shared_view(cpu, 4)
    assert view.peak_flops == cpu.peak_flops / 2 and view.collective_latency_s == cpu.collective_latency_s * 2
    assert view.efficiency.dp_overlap == 0.0
    h100 = load_hardware("h100")
    assert shared_view(h100, 8) is h100
    lay = "dp_replicate=2,tp=2,sequence_parallel=true,micro_batch_size=2,grad_accum=2"
    shared = _est(lay, SHARED, dpn=4).time.step_time
    alone = _est(lay, dict(SHARED, cores_per_node=4), dpn=4).time.step_time
    assert shared == pytest.approx(2 * alone, rel=0.05)
    with pytest.raises(PlanError, match="cores_per_node"):
        load_hardware("cpu", {"cores_per_node": -1})
    assert replace(cpu, cores_per_node=0.0) == shared_view(replace(cpu, cores_per_node=0.0), 64)
