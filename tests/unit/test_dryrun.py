"""Dry run (engine/dryrun/) as the regression test for precision and sharding: a 2-layer model
at Llama 3 8B width and vocabulary, one rank of a world of 8, under the fake process group.

    .venv/bin/python -m pytest tests/unit/test_dryrun.py -q                  # fast tier
    .venv/bin/python -m pytest tests/unit/test_dryrun.py -q -m slow -s      # + the 70B config

Each dry run runs in its own spawned process (dry_run_isolated), as the CLI does.
"""
from __future__ import annotations

import pytest

from raytune_llama.engine.dryrun import dry_run_isolated
from raytune_llama.planner.plan import ParallelPlan

SHAPED_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, vocab_size=128256,
                 num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=2, tie_word_embeddings=False,
                 max_position_embeddings=8192, rope_theta=500000.0)
H, I, V, KV = 4096, 14336, 128256, 1024
N_PARAMS = 2 * (2 * H * H + 2 * H * KV + 3 * H * I + 2 * H) + 2 * V * H + H
SEQ = 1024


def _run(plan: ParallelPlan) -> dict:
    return dry_run_isolated(SHAPED_8B, plan, rank=0, world_size=8, seq_len=SEQ, mixed_precision="bf16",
                            master_weights="fp32", hardware="h100", explain=12)


def _within_padding(measured: int, expected: float, shards: int, per_elem: int) -> bool:
    # FSDP2 pads every parameter's dim 0 to a multiple of the shard count.
    tensors = 2 * 9 + 3
    return expected <= measured <= expected + tensors * shards * H * per_elem


@pytest.fixture(scope="module")
def fsdp8():
    return _run(ParallelPlan(dp_shard=8, zero_stage=3, micro_batch_size=1, grad_accum=2))


@pytest.fixture(scope="module")
def tp2_sp_fsdp4():
    return _run(ParallelPlan(dp_shard=4, zero_stage=3, tp=2, sequence_parallel=True, micro_batch_size=1,
                             grad_accum=2))


@pytest.mark.parametrize("fixture,shards", [("fsdp8", 8), ("tp2_sp_fsdp4", 8)])
def test_master_weights_and_optimizer_state_are_fp32_and_sharded(request, fixture, shards):
    r = request.getfixturevalue(fixture)
    facts = r["facts"]
    assert facts["full_param_count"] == N_PARAMS
    assert facts["param_dtypes"] == ["torch.float32"]
    assert facts["optimizer_state_dtypes"] == ["torch.float32"]
    assert _within_padding(facts["local_param_bytes"], N_PARAMS * 4 / shards, shards, 4)
    assert _within_padding(facts["local_optimizer_bytes"], N_PARAMS * 8 / shards, shards, 8)
    # The tracker saw the same sharded masters and moments at the step's peak.
    measured = r["tracker_peak_bytes"]
    assert measured["Sharded Param"] == facts["local_param_bytes"]
    assert abs(measured["OptState"] - facts["local_optimizer_bytes"]) < 1024  # + AdamW's step counters


def test_logits_are_vocab_sharded_under_tensor_parallel(fsdp8, tp2_sp_fsdp4):
    assert fsdp8["facts"]["logits"] == {"shape": [1, SEQ, V], "dtype": "torch.bfloat16"}
    assert tp2_sp_fsdp4["facts"]["logits"] == {"shape": [1, SEQ, V // 2], "dtype": "torch.bfloat16"}
    # Every vocab-sized buffer halves: the step's activations/temporaries peak drops accordingly.
    assert tp2_sp_fsdp4["measured_peak_bytes"]["activations"] < 0.75 * fsdp8["measured_peak_bytes"]["activations"]


def test_prediction_is_for_the_same_stage_and_family(fsdp8, tp2_sp_fsdp4):
    for r in (fsdp8, tp2_sp_fsdp4):
        pred = r["predicted_bytes"]
        assert r["pp_stage"] == 0 and pred["state_family"] == "fsdp_zero3"
        assert pred["tensor_total"] == pytest.approx(pred["total"] - pred["runtime"] - pred["fragmentation"])
        # Sharded fp32 masters and moments are modelled exactly (the planner adds 2*root for params).
        assert pred["optimizer"] == pytest.approx(N_PARAMS * 8 / 8, rel=1e-6)


@pytest.mark.parametrize("fixture", ["fsdp8", "tp2_sp_fsdp4"])
def test_planner_predicts_the_measured_peak_within_10_percent(request, fixture):
    r = request.getfixturevalue(fixture)
    pred, measured = r["predicted_bytes"], r["measured_peak_bytes"]["total"]
    print(fixture, pred["phase"], measured / pred["tensor_total"])
    assert measured == pytest.approx(pred["tensor_total"], rel=0.10)


def test_live_at_peak_accounts_for_the_measured_peak(fsdp8, tp2_sp_fsdp4):
    # What the step created and is live at the peak, plus the parameters and optimizer state that
    # existed before it, is the tracker's peak: the explanation covers the whole measured number.
    # At this shape (2 layers, 128K vocabulary) the peak is the root unit's gradient reduction
    # at the end of backward, which the planner's "end of backward" phase predicts.
    for r in (fsdp8, tp2_sp_fsdp4):
        created = sum(row["bytes"] for row in r["live_at_peak"])
        before = r["facts"]["local_param_bytes"] + r["facts"]["local_optimizer_bytes"]
        assert created + before == pytest.approx(r["measured_peak_bytes"]["total"], rel=0.02), r["live_at_peak"]
        assert any(row["group"].startswith("backward") for row in r["live_at_peak"][:3])
        assert r["predicted_bytes"]["phase"] == "end of backward"


def test_fake_tensors_allocate_what_real_tensors_do(capsys):
    """bench/dryrun_gpu_check.py on the CPU: the same engine step with real tensors, tracked by the
    same tracker, peaks at the dry run's bytes (on a GPU the script compares with
    torch.cuda.max_memory_allocated instead)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "dryrun_gpu_check.py"
    spec = importlib.util.spec_from_file_location("dryrun_gpu_check", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--device", "cpu", "--smoke", "--mbs", "2", "--recompute", "selective,full", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["recompute"] for r in rows] == ["selective", "full"]
    for r in rows:
        assert r["real_peak_bytes"] == pytest.approx(r["dry_run_peak_bytes"], rel=0.01), r
        assert r["real_peak_bytes"] == pytest.approx(r["planner_tensor_bytes"], rel=0.10), r


def test_deepspeed_is_refused_with_the_reason():
    from raytune_llama.engine.dryrun import dry_run

    with pytest.raises(ValueError, match="backend: 'deepspeed' cannot be dry-run"):
        dry_run(SHAPED_8B, ParallelPlan(dp_shard=8, zero_stage=2, backend="deepspeed"), rank=0, seq_len=SEQ)


@pytest.mark.slow
def test_llama3_70b_mi250_config_one_stage_through_the_cli():
    from raytune_llama.cli.dryrun_command import dryrun_config, format_stage
    from raytune_llama.config import load_config

    cfg = load_config("examples/configs/llama3_70b_mi250.yaml", [])
    out = dryrun_config(cfg, world=64, nodes=8, devices_per_node=8, hardware="mi250", ranks=[0])
    stage = out["stages"][0]
    print(out["layout"])
    print(format_stage(stage))
    print(f"measured / predicted tensor bytes: "
          f"{stage['measured_peak_bytes']['total'] / stage['predicted_bytes']['tensor_total']:.3f}")
    assert stage["facts"]["param_dtypes"] == ["torch.float32"]
    # The planner's memory model agrees with the real engine step within 10% of the tensor bytes.
    assert stage["measured_peak_bytes"]["total"] == pytest.approx(stage["predicted_bytes"]["tensor_total"], rel=0.10)


def test_cli_helpers_pick_the_registry_config_the_topology_and_one_rank_per_stage():
    from raytune_llama.cli.dryrun_command import registry_config, stage_ranks, topology

    assert registry_config("meta-llama/Meta-Llama-3-70B")["num_hidden_layers"] == 80
    assert registry_config("llama3-8b")["hidden_size"] == 4096
    assert registry_config("someone/unknown-model") is None
    assert topology(64, None, None, "mi250") == (8, 8)
    assert topology(8, None, None, "h100") == (1, 8)
    plan = ParallelPlan(dp_shard=2, zero_stage=1, tp=8, sequence_parallel=True, pp=4, grad_accum=8)
    assert stage_ranks(plan, None) == [0, 8, 16, 24]  # mesh dp_replicate, dp_shard, pp, tp (tp innermost)
    assert stage_ranks(plan, [5]) == [5]


def test_plan_verify_dry_runs_the_chosen_layout(capsys):
    """`raytune-llama plan --verify`: the chosen layout is dry-run for every pipeline stage and
    the JSON carries the measured peak next to the prediction (model states match exactly)."""
    import json

    from raytune_llama.cli.plan_commands import main

    assert main(["plan", "--model", "tiny-llama", "--hardware", "cpu", "--nodes", "1", "--devices-per-node", "2",
                 "--seq-len", "64", "--global-batch", "8", "--compute-dtype", "fp32", "--verify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    stages = out["verify"]["stages"]
    assert len(stages) == out["plan"]["pp"]  # one rank per pipeline stage
    for stage in stages:
        # Within the rotary inv_freq buffer (64 bytes here), which the tracker files with parameters.
        assert stage["measured_peak_bytes"]["params"] == pytest.approx(stage["predicted_bytes"]["params"], abs=256)
        # Within AdamW's scalar `step` per parameter tensor (4 bytes each, 156 bytes here).
        assert stage["measured_peak_bytes"]["optimizer"] == pytest.approx(stage["predicted_bytes"]["optimizer"],
                                                                          abs=1024)
        assert stage["facts"]["param_dtypes"] == ["torch.float32"]
    assert out["verify"]["max_abs_error"] >= 0
