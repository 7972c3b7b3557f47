"""bench/published_runs.yaml and bench/published_runs.py: every published run is complete, cites its
source, and goes through the planner's estimate (no timing assertions: docs/planner.md,
"How accurate is the planner")."""
import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("published_runs", ROOT / "bench" / "published_runs.py")
pr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pr)

RUNS = pr.load_runs()


def test_data_file_has_enough_runs_and_sources():
    assert len(RUNS) >= 12
    ids = [r["id"] for r in RUNS]
    assert len(ids) == len(set(ids))
    sources = {}
    for r in RUNS:
        sources.setdefault(r["hardware"]["family"], set()).add(r["source"]["repo"])
    assert set(sources) == set(pr.FAMILIES)
    assert len(sources["MI250X"]) >= 2 and len(sources["MI300X"]) >= 2


@pytest.mark.parametrize("run", RUNS, ids=[r["id"] for r in RUNS])
def test_entry_is_complete_and_cites_its_source(run):
    assert pr.check_run(run) == []
    src = run["source"]
    assert src["repo"] and src["path"] and src["table"]
    assert len(str(src["commit"])) == 40 and int(str(src["commit"]), 16) >= 0


@pytest.mark.parametrize("run", RUNS, ids=[r["id"] for r in RUNS])
def test_estimate_runs_for_each_entry(run):
    row = pr.estimate_run(run, pr.base_hardware(run))
    assert row["predicted_tokens_per_s"] > 0 and math.isfinite(row["step_error"])
    assert row["published_tokens_per_s"] > 0
    if run["published"]["peak_memory"] is not None:
        assert row["memory_error"] is not None


def test_unmodelled_features_are_excluded_with_a_reason():
    for run in RUNS:
        why = pr.exclusion(run)
        if run["fp8"] or run["compile"] or (run["layout"]["cp"] or 1) > 1:
            assert why, run["id"]


def test_split_is_deterministic_and_disjoint():
    fit, held = pr.split(RUNS)
    assert (fit, held) == pr.split(list(reversed(RUNS)))
    assert not set(fit) & set(held)
    eligible = {r["id"] for r in RUNS if not pr.exclusion(r)}
    assert set(fit) | set(held) == eligible


def test_calibration_records_are_valid():
    from raytune_llama.planner.calibrate import validate_records

    validate_records([pr.calibration_record(r) for r in RUNS if not pr.exclusion(r)])
