"""The pure parts of `raytune-llama tune-layout` (trainer/tune_layout.py): layout strings that
give back the exact plan, ranks and Spearman's rank correlation, out-of-memory classification,
the steady-state measurement of a trial's step records, the summary and table, the calibrate
records, and the measured-layout file that `parallel.layout: measured` reads (trainer/planning.py)."""
import json

import pytest

from raytune_llama.planner import rank_stats

from raytune_llama.config import ConfigError, load_config
from raytune_llama.planner.api import complete_layout, plan
from raytune_llama.planner.calibrate import calibrate, load_results
from raytune_llama.planner.cluster import make_cluster
from raytune_llama.planner.plan import ParallelPlan
from raytune_llama.planner.workload import make_workload
from raytune_llama.presets import preset_hf_config
from raytune_llama.trainer import tune_layout as tl
from raytune_llama.trainer.planning import Topology, make_run_plan, measured_layout_path
from tests.unit.test_config import TINY

TOPO = Topology("cpu", 1, 2)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "tiny-llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(preset_hf_config("tiny-llama")))
    return str(d)


def _cfg(tmp_path, *overrides):
    return load_config(TINY, [f"run.storage_path={tmp_path}/runs", "run.name=tl", "parallel.num_workers=2",
                              "train.global_batch_size=16", *overrides])


# --- layout strings -------------------------------------------------------------------------

@pytest.mark.parametrize("p", [
    ParallelPlan(dp_replicate=2, micro_batch_size=4, grad_accum=2),
    ParallelPlan(dp_shard=2, zero_stage=1, offload=True, backend="deepspeed", micro_batch_size=8),
    ParallelPlan(tp=2, sequence_parallel=True, recompute="selective", grad_accum=16),
    ParallelPlan(dp_shard=2, zero_stage=3, pp=2, pp_schedule="interleaved_1f1b", virtual_stages=2, grad_accum=8),
])
def test_layout_spec_gives_back_the_exact_plan(p):
    spec = tl.layout_spec(p)
    wl = make_workload(p.global_batch(), 64)
    assert complete_layout(spec, make_cluster("cpu", 1, p.world_size), wl) == p


def test_every_planner_candidate_round_trips():
    res = plan("tiny-llama", cluster={"hardware": "cpu", "nodes": 1, "devices_per_node": 2},
               workload={"global_batch": 8, "seq_len": 64, "compute_dtype": "fp32"})
    wl = make_workload(8, 64, compute_dtype="fp32")
    for cand in [res.best, *res.alternatives]:
        assert complete_layout(tl.layout_spec(cand.plan), make_cluster("cpu", 1, 2), wl) == cand.plan
    assert len(res.alternatives) >= 2  # top-k 3 has three layouts on 2 CPU workers (the integration test)


# --- ranks and Spearman ---------------------------------------------------------------------

def test_ranks_are_competition_ranks_and_skip_unknowns():
    assert rank_stats.ranks([3.0, 1.0, 2.0]) == [3, 1, 2]
    assert rank_stats.ranks([1.0, 2.0, 2.0, 5.0]) == [1, 2, 2, 4]
    assert rank_stats.ranks([None, 2.0, 1.0]) == [None, 2, 1]
    assert rank_stats.ranks([]) == []


def test_spearman():
    assert rank_stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_stats.spearman([1, 2, 3], [0.2, 0.1, 0.3]) == pytest.approx(0.5)  # 1 - 6*2/(3*8)
    # monotone transforms do not matter, only the order
    assert rank_stats.spearman([1, 5, 100], [0.001, 0.002, 0.003]) == pytest.approx(1.0)
    # ties take average ranks (Pearson of the ranks): x ranks 1.5,1.5,3 vs 1,2,3
    assert rank_stats.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, rel=1e-6)
    # pairs with a missing side are left out; too few pairs or no spread: None
    assert rank_stats.spearman([1, None, 3, 2], [1, 5, 3, 2]) == pytest.approx(1.0)
    assert rank_stats.spearman([1], [2]) is None
    assert rank_stats.spearman([1, 1], [1, 2]) is None


# --- failures -------------------------------------------------------------------------------

def test_out_of_memory_is_oom_wherever_it_sits():
    torch = pytest.importorskip("torch")
    assert tl.classify_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "oom"
    try:  # wrapped, as Ray Train passes a worker's error on
        try:
            raise torch.OutOfMemoryError("HIP out of memory. Tried to allocate 1.50 GiB")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("Training failed due to worker errors") from inner
    except RuntimeError as outer:
        assert tl.classify_failure(outer) == "oom"
        assert "out of memory" in tl.failure_message(outer)


def test_oom_in_text_only_and_other_errors():
    # Ray Train v2 / Tune pass a worker's traceback on as text inside their own errors
    text = ("ray.train.WorkerGroupError: Training failed due to worker errors:\n[Rank 0]\nTraceback ...\n"
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.1 GiB total)")
    assert tl.classify_failure(RuntimeError(text)) == "oom"
    assert tl.failure_message(RuntimeError(text)).startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert tl.classify_failure("Task was killed due to the node running low on memory.") == "oom"

    class OutOfMemoryError(Exception):  # ray.exceptions.OutOfMemoryError's name
        pass
    assert tl.classify_failure(OutOfMemoryError("worker killed")) == "oom"
    assert tl.classify_failure(ValueError("parallel.layout: 'tp=3' cannot run")) == "error"
    assert tl.classify_failure(RuntimeError("NCCL timeout\nmemory usage was fine")) == "error"
    assert tl.classify_failure(None) == "error"
    assert tl.failure_message(RuntimeError("line one\n  last line  \n")) == "last line"


# --- measurement ----------------------------------------------------------------------------

def _records(times, peak=None):
    return [{"step": i + 1, "step_time_s": t, "tokens_per_s": 1000 / t, "mfu": 0.01 / t,
             **({"peak_memory_bytes": peak + i} if peak else {})} for i, t in enumerate(times)]


def test_warmup_steps():
    assert [tl.warmup_steps(n) for n in (1, 2, 3, 5, 6, 8, 20)] == [0, 1, 1, 1, 2, 2, 2]


def test_steady_state_is_the_median_after_warmup():
    m = tl.steady_state(_records([5.0, 2.0, 1.0, 1.2, 9.0, 1.1, 1.0, 1.3]), warmup=2)
    assert m["steps_measured"] == [3, 4, 5, 6, 7, 8]
    assert m["measured_step_time_s"] == pytest.approx(1.15)  # median of 1.0 1.2 9.0 1.1 1.0 1.3
    assert m["step_time_spread_pct"] == pytest.approx(100 * 8.0 / 2.3)  # half the range over the median
    assert m["measured_tokens_per_s"] == pytest.approx(1000 / 1.15, rel=0.05)
    assert m["measured_peak_memory_bytes"] is None  # records without a peak (none reported)
    m = tl.steady_state(list(reversed(_records([3.0, 1.0, 2.0], peak=100))), warmup=1)
    assert m["measured_step_time_s"] == pytest.approx(1.5) and m["measured_peak_memory_bytes"] == 102
    assert m["step_times_s"] == [3.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        tl.steady_state([], 1)


def _trials():
    base = {"layout_spec": "x", "predicted_memory_bytes": 1, "measured_peak_memory_bytes": None}
    return [dict(base, index=0, layout="A", predicted_step_time_s=1.0, measured_step_time_s=3.0, status="ok"),
            dict(base, index=1, layout="B", predicted_step_time_s=2.0, measured_step_time_s=1.0, status="ok"),
            dict(base, index=2, layout="C", predicted_step_time_s=3.0, measured_step_time_s=None, status="oom",
                 error="CUDA out of memory"),
            dict(base, index=3, layout="D", predicted_step_time_s=4.0, measured_step_time_s=2.0, status="ok")]


def test_summary_ranks_winner_and_correlation():
    rep = tl.summarize(_trials())
    assert [t["predicted_rank"] for t in rep["trials"]] == [1, 2, 3, 4]
    assert [t["measured_rank"] for t in rep["trials"]] == [3, 1, None, 2]
    assert rep["winner"]["layout"] == "B"  # the fastest ok trial, not the fastest predicted
    assert rep["spearman"] == pytest.approx(-0.5)  # over A, B, D: (1,2,3) vs (3,1,2)
    assert all(k in t for t in rep["trials"] for k in tl.TRIAL_KEYS)
    text = tl.format_report({**rep, "steps": 8, "warmup_steps": 2})
    assert "winner: B" in text and "-0.50" in text and "oom" in text and "CUDA out of memory" in text
    none = tl.summarize([dict(t, status="error") for t in _trials()])
    assert none["winner"] is None and none["spearman"] is None
    assert "winner: none" in tl.format_report({**none, "steps": 8})


def test_records_load_and_calibrate(tmp_path, model_dir):
    ctx = {"model": model_dir, "hardware": "cpu", "nodes": 1, "devices_per_node": 2, "seq_len": 64,
           "global_batch": 8, "optimizer": "adamw", "compute_dtype": "fp32", "lora_rank": 0, "lora_targets": None,
           "attention_mask": "documents"}
    res = plan(model_dir, cluster={"hardware": "cpu", "nodes": 1, "devices_per_node": 2},
               workload={"global_batch": 8, "seq_len": 64, "compute_dtype": "fp32", "attention_mask": "documents"})
    trials = [{"index": i, "layout": c.plan.describe(), "layout_spec": tl.layout_spec(c.plan), "status": "ok",
               "predicted_step_time_s": c.time.step_time, "predicted_memory_bytes": int(c.memory.total),
               "measured_step_time_s": 0.05 * (3 - i), "measured_peak_memory_bytes": None}
              for i, c in enumerate([res.best, *res.alternatives[:2]])]
    records = [tl.calibration_record(t, ctx) for t in trials]
    tl.write_json(tmp_path / "records.json", records)
    loaded = load_results(tmp_path / "records.json")
    assert [r["layout"] for r in loaded] == [t["layout_spec"] for t in trials]
    # the calibrate loader predicts what the search predicted (same model, cluster and workload)
    _, report = calibrate(loaded, "cpu")
    for row, t in zip(report["runs"], trials):
        assert row["predicted_before_s"] == pytest.approx(t["predicted_step_time_s"], rel=1e-9)
    cal = tl.calibrate_from(records, trials, tmp_path / "profile.yaml")
    assert (tmp_path / "profile.yaml").is_file() and cal["spearman_before"] == pytest.approx(-1.0)
    assert cal["step_time_error_pct_after"] < cal["step_time_error_pct_before"]
    assert all("predicted_rank_calibrated" in t for t in trials)


# --- the measured layout file ----------------------------------------------------------------

def test_measured_layout_round_trip(tmp_path, model_dir):
    cfg = _cfg(tmp_path, "parallel.layout=measured")
    cfg.validate(check_files=False)  # "measured" is a layout value the config accepts
    with pytest.raises(ConfigError, match="raytune-llama tune-layout"):
        make_run_plan(cfg, model_dir, topology=TOPO)
    chosen = ParallelPlan(dp_shard=2, zero_stage=1, micro_batch_size=8, backend="deepspeed", offload=True)
    winner = {"layout": chosen.describe(), "layout_spec": tl.layout_spec(chosen), "measured_step_time_s": 0.08,
              "predicted_step_time_s": 0.008}
    ctx = {"model": model_dir, "nodes": 1, "devices_per_node": 2, "global_batch": 16, "seq_len": 128}
    path = measured_layout_path(cfg)
    assert path == tmp_path / "runs" / "tl" / "tune_layout" / "measured_layout.json"
    tl.write_json(path, tl.measured_layout_record(winner, ctx, TOPO.to_dict(), steps=8))
    run = make_run_plan(cfg, model_dir, topology=TOPO)
    assert run.plan == chosen and run.source == "parallel.layout: measured" and run.predicted_step_time_s > 0
    # measured for another workload or world size: a clear error, not a silent other layout
    with pytest.raises(ConfigError, match="global_batch 16 .this run: 32.*tune-layout"):
        make_run_plan(_cfg(tmp_path, "parallel.layout=measured", "train.global_batch_size=32"), model_dir,
                      topology=TOPO)
    with pytest.raises(ConfigError, match="world_size 2 .this run: 4"):
        make_run_plan(_cfg(tmp_path, "parallel.layout=measured", "parallel.num_workers=4"), model_dir,
                      topology=Topology("cpu", 1, 4))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        make_run_plan(cfg, model_dir, topology=TOPO)


def test_config_check_accepts_measured_only_as_a_word(tmp_path):
    _cfg(tmp_path, "parallel.layout=measured").validate(check_files=False)
    with pytest.raises(ConfigError, match="\"measured\""):
        _cfg(tmp_path, "parallel.layout=measure").validate(check_files=False)


def test_trial_config_is_a_fresh_quiet_run(tmp_path):
    cfg = _cfg(tmp_path, "train.max_steps=5", "checkpoint.every_steps=2", "run.trackers=[\"tensorboard\"]",
               "parallel.min_workers=1", "checkpoint.async_save=true", "checkpoint.format=sharded")
    d = tl.trial_config(cfg, "dp_replicate=2,micro_batch_size=8", "tl-layout-0-abc", 8, tmp_path / "trials",
                        str(tmp_path / "store"))
    assert d["parallel"]["layout"] == "dp_replicate=2,micro_batch_size=8" and d["parallel"]["min_workers"] is None
    assert d["train"]["stop_after_steps"] == 8 and d["train"]["max_steps"] == 9  # stops before max: no export
    assert d["train"]["log_every"] == 1
    assert d["checkpoint"]["every_steps"] == 0 and d["checkpoint"]["resume"] == "never"
    assert d["checkpoint"]["async_save"] is False
    assert d["run"]["name"] == "tl-layout-0-abc" and d["run"]["storage_path"] == str(tmp_path / "trials")
    assert d["run"]["trackers"] == [] and d["run"]["max_failures"] == 0
    assert d["data"]["store_dir"] == str(tmp_path / "store")
