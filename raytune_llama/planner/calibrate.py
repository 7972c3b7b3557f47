"""Fit a hardware profile's efficiency factors to measured runs.

    raytune-llama calibrate RESULTS.json --out mi250-calibrated.yaml
    raytune-llama plan ... --profile mi250-calibrated.yaml

RESULTS.json is a list of records, one per measured run:
    {"model": "llama3-8b", "hardware": "mi250", "nodes": 1, "devices_per_node": 8,
     "seq_len": 4096, "global_batch": 64, "layout": "dp_shard=8,micro_batch_size=2,recompute=full",
     "measured_step_time_s": 21.3, "measured_peak_memory_bytes": 51234567890,
     "optimizer": "adamw", "compute_dtype": "bf16"}
optimizer (default adamw) and compute_dtype (default bf16; "fp32" for runs without autocast, as on
CPU) are optional and feed the memory model; peak memory may be null.
Time knobs fitted (log-error least squares, coordinate descent in log space, with a weak pull toward
the starting values so one record moves mostly the compute factor): efficiency.matmul_max,
efficiency.memory_bw (elementwise/optimizer kernels), efficiency.network, collective_latency_s (per collective call: separates layouts that issue
different numbers of collectives) and layer_overhead_s (per layer per micro-batch: separates
layouts with different micro-batch counts). Memory knob: activation_scale. The report lists every
knob whose fit stopped at a search bound (`at_bound`).
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
# (knob, low, high, prior weight): searched in log space. Latency and overhead are unknown to
# orders of magnitude (15 us NCCL .. 10 ms for gloo on a busy box), so their pull is weaker.
TIME_KNOBS = (("efficiency.matmul_max", 1e-3, 1.5, PRIOR), ("efficiency.memory_bw", 1e-3, 1.5, PRIOR),
              ("efficiency.network", 1e-3, 1.5, PRIOR),
              ("collective_latency_s", 1e-7, 1.0, PRIOR / 10), ("layer_overhead_s", 1e-7, 1.0, PRIOR / 10))
MEMORY_BOUNDS = (0.05, 20.0)
SWEEPS = 6


def load_results(path: "str | os.PathLike") -> list[dict[str, Any]]:
    """Read and validate a calibration RESULTS.json."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError("results", str(path), f"cannot read JSON ({exc})", "see docs/planner.md for the format") from exc
    if not isinstance(data, list) or not data:
        raise PlanError("results", str(path), "must be a non-empty JSON list of run records", "see docs/planner.md")
    validate_records(data)
    return data


def validate_records(records: Any) -> None:
    """Raise a PlanError naming the field and the fix for an empty list or an incomplete record."""
    if not isinstance(records, list) or not records:
        raise PlanError("records", records, "no measured runs to calibrate from",
                        "pass a non-empty list of run records, each with fields " + ", ".join(REQUIRED)
                        + " (e.g. load_results('RESULTS.json'); see docs/planner.md)")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise PlanError(f"records[{i}]", rec, "must be a dict (one measured run)", "see docs/planner.md")
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise PlanError(f"records[{i}]", sorted(rec), f"missing field(s) {missing}", "see docs/planner.md")
        if not float(rec["measured_step_time_s"]) > 0:
            raise PlanError(f"records[{i}].measured_step_time_s", rec["measured_step_time_s"], "must be > 0", "")


def _get(hw: HardwareSpec, knob: str) -> float:
    obj, _, name = knob.rpartition(".")
    return getattr(hw.efficiency if obj else hw, name)


def _set(hw: HardwareSpec, knob: str, x: float) -> HardwareSpec:
    obj, _, name = knob.rpartition(".")
    if obj:
        return replace(hw, efficiency=replace(hw.efficiency, **{name: x}))
    return replace(hw, **{name: x})


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
        # The run's precision: fp32 CPU runs (no autocast) must say compute_dtype "fp32".
        wl = make_workload(int(rec["global_batch"]), int(rec["seq_len"]), rec.get("optimizer", "adamw"), headroom=0.0,
                           compute_dtype=rec.get("compute_dtype", "bf16"), lora_rank=int(rec.get("lora_rank", 0)),
                           lora_targets=rec.get("lora_targets"),
                           attention_mask=rec.get("attention_mask", "causal"))
        cases.append((model, int(rec["nodes"]), int(rec["devices_per_node"]), wl, rec))
    return cases


def _predict(hw: HardwareSpec, case: tuple) -> tuple[float, float]:
    model, nodes, dpn, wl, rec = case
    cluster = ClusterSpec(nodes, dpn, hw)
    plan = complete_layout(rec["layout"], cluster, wl)
    return step_time(model, cluster, wl, plan).step_time, memory_breakdown(model, cluster, wl, plan).total


def _bound_hit(x: float, lo: float, hi: float) -> str | None:
    if x <= lo * 1.01:
        return "lower"
    return "upper" if x >= hi / 1.01 else None


def calibrate(records: list[dict[str, Any]], hardware: str | None = None, profile: Any = None) -> tuple[HardwareSpec, dict[str, Any]]:
    """Fit the profile of one hardware kind to its records; returns (profile, report)."""
    validate_records(records)
    kinds = sorted({str(r["hardware"]).lower() for r in records})
    kind = (hardware or (kinds[0] if len(kinds) == 1 else "")).lower()
    if not kind:
        raise PlanError("hardware", kinds, "results mix hardware kinds", "pass --hardware to pick one")
    records = [r for r in records if str(r["hardware"]).lower() == kind]
    if not records:
        raise PlanError("hardware", kind, "no records for this hardware", f"pick one of the records' kinds {kinds}")
    base = load_hardware(kind, profile)
    cases = _cases(records)

    def time_err(hw: HardwareSpec) -> float:
        return sum(math.log(_predict(hw, c)[0] / float(c[4]["measured_step_time_s"])) ** 2 for c in cases) / len(cases)

    hw = base
    for _ in range(SWEEPS):  # coordinate descent over the time knobs, each a golden search in log x
        start = hw
        for knob, lo, hi, weight in TIME_KNOBS:
            x0 = max(_get(base, knob), lo)
            def obj(u: float, knob: str = knob, x0: float = x0, weight: float = weight) -> float:
                return time_err(_set(hw, knob, math.exp(u))) + weight * (u - math.log(x0)) ** 2
            hw = _set(hw, knob, float(f"{math.exp(_golden(obj, math.log(lo), math.log(hi))):.4g}"))
        if hw == start:
            break
    at_bound = {k: b for k, lo, hi, _ in TIME_KNOBS if (b := _bound_hit(_get(hw, k), lo, hi))}
    mem_cases = [c for c in cases if c[4].get("measured_peak_memory_bytes")]
    if mem_cases:
        def mem_err(u: float) -> float:
            h = replace(hw, activation_scale=math.exp(u))
            return sum(math.log(_predict(h, c)[1] / float(c[4]["measured_peak_memory_bytes"])) ** 2 for c in mem_cases)
        lo, hi = MEMORY_BOUNDS
        hw = replace(hw, activation_scale=float(f"{math.exp(_golden(mem_err, math.log(lo), math.log(hi))):.4g}"))
        if b := _bound_hit(hw.activation_scale, lo, hi):
            at_bound["activation_scale"] = b
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
              "fitted": {**{k: _get(hw, k) for k, *_ in TIME_KNOBS}, "activation_scale": hw.activation_scale},
              "at_bound": at_bound,
              "warnings": [f"{k} stopped at the {b} bound of its search ({_get(hw, k)}): "
                           "the model cannot explain these runs with this knob; check the profile's units "
                           "(e.g. peak_flops per device, cores_per_node)" for k, b in at_bound.items()],
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
