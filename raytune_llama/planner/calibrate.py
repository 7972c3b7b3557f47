"""Fit a hardware profile's efficiency factors to measured runs.

    raytune-llama calibrate RESULTS.json --out mi250-calibrated.yaml
    raytune-llama plan ... --profile mi250-calibrated.yaml

RESULTS.json is a list of records, one per measured run:
    {"model": "llama3-8b", "hardware": "mi250", "nodes": 1, "devices_per_node": 8,
     "seq_len": 4096, "global_batch": 64, "layout": "dp_shard=8,micro_batch_size=2,recompute=full",
     "measured_step_time_s": 21.3, "measured_peak_memory_bytes": 51234567890,
     "optimizer": "adamw"}          # optimizer optional; peak memory may be null
Time knobs fitted: efficiency.matmul_max and efficiency.network (log-error least squares with a
weak pull toward the starting values, so one record moves mostly the compute factor);
memory knob: activation_scale.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from raytune_llama.planner.api import complete_layout
from raytune_llama.planner.cluster import ClusterSpec
from raytune_llama.planner.errors import PlanError
from raytune_llama.planner.hardware import HardwareSpec, load_hardware, profile_yaml
from raytune_llama.planner.memory_model import memory_breakdown
from raytune_llama.planner.model_spec import load_model
from raytune_llama.planner.time_model import step_time
from raytune_llama.planner.workload import make_workload

REQUIRED = ("model", "hardware", "nodes", "devices_per_node", "seq_len", "global_batch", "layout",
            "measured_step_time_s")
PRIOR = 0.02  # weight of the pull toward the starting value (log space)


def load_results(path: "str | os.PathLike") -> list[dict[str, Any]]:
    """Read and validate a calibration RESULTS.json."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError("results", str(path), f"cannot read JSON ({exc})", "see docs/planner.md for the format") from exc
    if not isinstance(data, list) or not data:
        raise PlanError("results", str(path), "must be a non-empty JSON list of run records", "see docs/planner.md")
    for i, rec in enumerate(data):
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise PlanError(f"results[{i}]", sorted(rec), f"missing field(s) {missing}", "see docs/planner.md")
        if not float(rec["measured_step_time_s"]) > 0:
            raise PlanError(f"results[{i}].measured_step_time_s", rec["measured_step_time_s"], "must be > 0", "")
    return data


def _golden(f: Callable[[float], float], lo: float, hi: float, iters: int = 40) -> float:
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def _cases(records: list[dict[str, Any]]) -> list[tuple]:
    cases = []
    for rec in records:
        model = load_model(rec["model"])
        wl = make_workload(int(rec["global_batch"]), int(rec["seq_len"]), rec.get("optimizer", "adamw"), headroom=0.0)
        cases.append((model, int(rec["nodes"]), int(rec["devices_per_node"]), wl, rec))
    return cases


def _predict(hw: HardwareSpec, case: tuple) -> tuple[float, float]:
    model, nodes, dpn, wl, rec = case
    cluster = ClusterSpec(nodes, dpn, hw)
    plan = complete_layout(rec["layout"], cluster, wl)
    return step_time(model, cluster, wl, plan).step_time, memory_breakdown(model, cluster, wl, plan).total


def calibrate(records: list[dict[str, Any]], hardware: str | None = None, profile: Any = None) -> tuple[HardwareSpec, dict[str, Any]]:
    """Fit the profile of one hardware kind to its records; returns (profile, report)."""
    kinds = sorted({str(r["hardware"]).lower() for r in records})
    kind = (hardware or (kinds[0] if len(kinds) == 1 else "")).lower()
    if not kind:
        raise PlanError("hardware", kinds, "results mix hardware kinds", "pass --hardware to pick one")
    records = [r for r in records if str(r["hardware"]).lower() == kind]
    if not records:
        raise PlanError("hardware", kind, "no records for this hardware", f"records have {kinds}")
    base = load_hardware(kind, profile)
    cases = _cases(records)

    def time_err(hw: HardwareSpec) -> float:
        return sum(math.log(_predict(hw, c)[0] / float(c[4]["measured_step_time_s"])) ** 2 for c in cases) / len(cases)

    hw = base
    for _ in range(3):  # coordinate descent over the two time knobs
        for knob, lo, hi in (("matmul_max", 0.05, 1.2), ("network", 0.05, 1.0)):
            x0 = getattr(base.efficiency, knob)
            def obj(x: float, knob: str = knob, x0: float = x0) -> float:
                return time_err(replace(hw, efficiency=replace(hw.efficiency, **{knob: x}))) + PRIOR * math.log(x / x0) ** 2
            best = _golden(obj, lo, hi)
            hw = replace(hw, efficiency=replace(hw.efficiency, **{knob: round(best, 4)}))
    mem_cases = [c for c in cases if c[4].get("measured_peak_memory_bytes")]
    if mem_cases:
        def mem_err(scale: float) -> float:
            h = replace(hw, activation_scale=scale)
            return sum(math.log(_predict(h, c)[1] / float(c[4]["measured_peak_memory_bytes"])) ** 2 for c in mem_cases)
        hw = replace(hw, activation_scale=round(_golden(mem_err, 0.2, 5.0), 4))
    rows = []
    for c in cases:
        t0, m0 = _predict(base, c)
        t1, m1 = _predict(hw, c)
        rec = c[4]
        rows.append({"model": rec["model"], "layout": rec["layout"], "measured_step_time_s": rec["measured_step_time_s"],
                     "predicted_before_s": t0, "predicted_after_s": t1,
                     "measured_peak_memory_bytes": rec.get("measured_peak_memory_bytes"),
                     "predicted_memory_before": int(m0), "predicted_memory_after": int(m1)})

    def mape(key: str, meas: str) -> float | None:
        vals = [abs(r[key] / r[meas] - 1) for r in rows if r.get(meas)]
        return round(100 * sum(vals) / len(vals), 2) if vals else None
    report = {"hardware": kind, "records": len(rows),
              "fitted": {"efficiency.matmul_max": hw.efficiency.matmul_max, "efficiency.network": hw.efficiency.network,
                         "activation_scale": hw.activation_scale},
              "step_time_error_pct_before": mape("predicted_before_s", "measured_step_time_s"),
              "step_time_error_pct_after": mape("predicted_after_s", "measured_step_time_s"),
              "memory_error_pct_before": mape("predicted_memory_before", "measured_peak_memory_bytes"),
              "memory_error_pct_after": mape("predicted_memory_after", "measured_peak_memory_bytes"),
              "runs": rows}
    return hw, report


def write_profile(hw: HardwareSpec, report: dict[str, Any], out: "str | os.PathLike") -> None:
    """Write the calibrated profile YAML (reusable with plan --profile)."""
    summary = {k: v for k, v in report.items() if k != "runs"}
    Path(out).write_text("# Calibrated by raytune-llama calibrate; reuse with: raytune-llama plan --profile THIS.yaml\n"
                         + profile_yaml(hw, summary))
