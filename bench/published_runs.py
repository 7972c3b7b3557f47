"""The planner against the published record: published training runs (bench/published_runs.yaml)
through `estimate`, predicted vs published tokens/s per device (and peak memory where published),
then a fit of the profile efficiencies with the project's calibrate machinery on one half of the
runs and the error on the other half, before and after.

    .venv/bin/python bench/published_runs.py                 # table, split, fit, held-out errors
    .venv/bin/python bench/published_runs.py --no-fit        # predictions only
    .venv/bin/python bench/published_runs.py --json out.json # everything as JSON as well
    .venv/bin/python bench/published_runs.py --profiles-out DIR   # write the fitted profiles

Conventions (docs/planner.md, "How accurate is the planner"):
* Error = predicted / published - 1 of the step time (published tokens/s over predicted tokens/s,
  minus 1): positive means the planner predicts a slower step than was measured.
* Each run is estimated on its planner profile (`hardware.profile`) with the overrides the source
  states (`hardware.overrides`: memory size, memory bandwidth); a run with overrides is its own
  profile variant (`hardware.variant`) in the fit.
* Runs that used a technique the time model does not have (FP8 GEMMs, torch.compile, context
  parallel, overlapped TP communication) or whose layout is not fully published are estimated and
  shown but kept out of the fit and out of the held-out statistics, with the reason.
* Split rule: the fit-eligible runs of each profile (variant), sorted by id, alternate fit,
  held-out, fit, ...; a profile with a single eligible run puts it in the held-out half (there is
  nothing to fit it with; it tests the shipped profile).
* Fit: `raytune_llama.planner.calibrate.calibrate` on the fit-half records of each profile, from
  that profile as shipped (plus the run's overrides).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raytune_llama.planner.api import estimate  # noqa: E402
from raytune_llama.planner.calibrate import calibrate, write_profile  # noqa: E402
from raytune_llama.planner.cluster import ClusterSpec  # noqa: E402
from raytune_llama.planner.hardware import HardwareSpec, builtin_names, load_hardware  # noqa: E402
from raytune_llama.planner.model_spec import ModelSpec, from_hf_config, load_model  # noqa: E402

DATA = Path(__file__).with_name("published_runs.yaml")
GIB = 2**30
FAMILIES = ("H100", "A100", "MI250X", "MI300X")
REQUIRED = ("id", "source", "framework", "hardware", "model", "devices", "devices_per_node", "seq_len",
            "global_batch", "micro_batch", "layout", "recompute", "compile", "fp8", "optimizer", "published")
SOURCE_KEYS = ("repo", "path", "commit", "table")
HARDWARE_KEYS = ("family", "profile", "device", "memory_gb", "power_w", "interconnect")
LAYOUT_KEYS = ("dp_replicate", "dp_shard", "zero_stage", "tp", "pp", "cp")
PUBLISHED_KEYS = ("tokens_per_s_per_device", "mfu", "peak_memory", "peak_memory_unit")
# Techniques the time model does not have (docs/planner.md, "Accuracy and limits": "Not modelled").
UNMODELLED = {
    "float8_linear": "FP8 GEMMs", "float8_rowwise": "FP8 GEMMs", "fp8_current_scaling": "FP8 GEMMs",
    "torch_compile": "torch.compile (fused elementwise kernels)", "context_parallel": "context parallel",
    "tp_comm_overlap": "TP communication overlapped with GEMMs", "async_tp": "async TP",
}


# ----------------------------------------------------------------------------------------------
# Loading and checking the data file
# ----------------------------------------------------------------------------------------------
def load_runs(path: "str | Path" = DATA) -> list[dict[str, Any]]:
    """The published runs, as listed in the data file."""
    runs = yaml.safe_load(Path(path).read_text())
    if not isinstance(runs, list):
        raise ValueError(f"{path}: expected a YAML list of runs")
    return runs


def check_run(run: dict[str, Any]) -> list[str]:
    """Problems with one entry (empty when it is complete): required fields present, a source that
    names where the numbers come from, a published throughput (or what it is derived from)."""
    rid = run.get("id", "<no id>")
    problems = [f"{rid}: missing field {k!r}" for k in REQUIRED if k not in run]
    if problems:
        return problems
    src = run["source"] or {}
    problems += [f"{rid}: source lacks {k!r}" for k in SOURCE_KEYS if not src.get(k)]
    hw = run["hardware"] or {}
    problems += [f"{rid}: hardware lacks {k!r}" for k in HARDWARE_KEYS if k not in hw]
    if hw.get("family") not in FAMILIES:
        problems.append(f"{rid}: hardware.family {hw.get('family')!r} not one of {FAMILIES}")
    problems += [f"{rid}: layout lacks {k!r}" for k in LAYOUT_KEYS if k not in (run["layout"] or {})]
    pub = run["published"] or {}
    problems += [f"{rid}: published lacks {k!r}" for k in PUBLISHED_KEYS if k not in pub]
    if not (pub.get("tokens_per_s_per_device") or pub.get("step_time_s") or pub.get("tflops_per_device")):
        problems.append(f"{rid}: no published throughput (tokens/s, step time or TFLOP/s)")
    lay = run["layout"]
    degrees = (lay.get("dp_replicate") or 1) * (lay.get("dp_shard") or 1) * (lay.get("tp") or 1) \
        * (lay.get("pp") or 1) * (lay.get("cp") or 1)
    if degrees != run["devices"]:
        problems.append(f"{rid}: layout degrees multiply to {degrees}, not devices {run['devices']}")
    if run["devices"] % run["devices_per_node"]:
        problems.append(f"{rid}: devices not a multiple of devices_per_node")
    missing = [k for k in ("micro_batch", "recompute") if run.get(k) is None]
    if missing and run.get("layout_complete", True):
        problems.append(f"{rid}: {missing} not published but layout_complete is not false")
    for k in missing:
        if k not in (run.get("assumptions") or {}):
            problems.append(f"{rid}: {k} is null and has no entry under assumptions")
    return problems


# ----------------------------------------------------------------------------------------------
# One run -> planner inputs
# ----------------------------------------------------------------------------------------------
def model_of(run: dict[str, Any]) -> ModelSpec:
    """Registry name or {name, hf_config} -> ModelSpec."""
    m = run["model"]
    if isinstance(m, str):
        return load_model(m)
    return from_hf_config(m["hf_config"], name=m["name"])


def profile_key(run: dict[str, Any]) -> str:
    """The profile the fit groups by: the variant when the source's hardware differs from the profile."""
    hw = run["hardware"]
    return hw.get("variant") or hw["profile"]


def base_hardware(run: dict[str, Any], rail: bool = False) -> HardwareSpec:
    """The run's starting profile: the planner profile with the source's overrides (named after
    the variant). `rail`: the what-if of `rail_what_if` applied."""
    hw = run["hardware"]
    spec = load_hardware(hw["profile"])
    over = dict(hw.get("overrides") or {})
    if over or hw.get("variant"):
        spec = replace(spec, name=profile_key(run), **{k: float(v) for k, v in over.items()})
    return rail_what_if(spec) if rail else spec


def shipped_hardware(run: dict[str, Any]) -> HardwareSpec:
    """The profile the planner ships now for this run: the variant's own profile once one is
    shipped under that name, else the starting profile."""
    variant = run["hardware"].get("variant")
    return load_hardware(variant) if variant and variant in builtin_names() else base_hardware(run)


def rail_what_if(spec: HardwareSpec) -> HardwareSpec:
    """What-if (not the planner's model): a ring collective over a group holding every device of
    each node it spans moves its cross-node share over all the node's NICs at once (one NIC per
    device, each ring channel through a different NIC), so its bus bandwidth is the node's NIC
    total, capped by the in-node links, instead of one device's NIC share. Applied to every
    cross-node group, which overstates groups with one member per node (HSDP replicas, pipeline
    p2p); used only to show what the time model lacks."""
    return replace(spec, inter_node_bw=min(spec.intra_node_bw, spec.inter_node_bw * spec.devices_per_node))


def _assumed(run: dict[str, Any], key: str, default: Any) -> Any:
    """A planner input the source leaves null: the value stated under assumptions (leading token)."""
    text = str((run.get("assumptions") or {}).get(key, ""))
    token = text.split(" ", 1)[0].strip(":,") if text else ""
    if token.isdigit():
        return int(token)
    return token or default


def layout_of(run: dict[str, Any]) -> dict[str, Any]:
    """ParallelPlan fields for `estimate` (grad_accum follows from the global batch). Context
    parallel ranks are counted as data parallel at the full sequence (the planner has no CP)."""
    lay = run["layout"]
    cp = lay.get("cp") or 1
    mbs = run["micro_batch"] if run["micro_batch"] is not None else _assumed(run, "micro_batch", 1)
    rec = run["recompute"] if run["recompute"] is not None else _assumed(run, "recompute", "none")
    tp, pp = lay.get("tp") or 1, lay.get("pp") or 1
    d: dict[str, Any] = {"dp_replicate": lay.get("dp_replicate") or 1,
                         "dp_shard": (lay.get("dp_shard") or 1) * cp,
                         "zero_stage": lay.get("zero_stage", 3), "tp": tp, "pp": pp,
                         "sequence_parallel": tp > 1, "micro_batch_size": int(mbs), "recompute": rec}
    if d["dp_shard"] == 1 and d["zero_stage"]:
        d["zero_stage"] = 0
    if pp > 1:
        v = lay.get("vp") or 1
        d["virtual_stages"] = v
        d["pp_schedule"] = lay.get("schedule") or ("interleaved_1f1b" if v > 1 else "1f1b")
    return d


def published_tokens(run: dict[str, Any], model: ModelSpec | None = None) -> float:
    """Published tokens/s per device, or the source's own quantity converted the stated way."""
    pub = run["published"]
    if pub.get("tokens_per_s_per_device"):
        return float(pub["tokens_per_s_per_device"])
    if pub.get("step_time_s"):
        return run["global_batch"] * run["seq_len"] / (pub["step_time_s"] * run["devices"])
    method = (run.get("derived") or {}).get("method")
    if method == "megatron_gpt_flops" and pub.get("tflops_per_device"):
        m = model or model_of(run)
        l, h, s, v = m.num_layers, m.hidden_size, run["seq_len"], m.vocab_size
        per_token = 72.0 * l * h * h * (1 + s / (6.0 * h) + v / (12.0 * h * l))
        return pub["tflops_per_device"] * 1e12 / per_token
    raise ValueError(f"{run['id']}: no published throughput to compare with")


def published_memory_gib(run: dict[str, Any]) -> float | None:
    """Published peak memory in GiB (sources in GB converted)."""
    pub = run["published"]
    if pub.get("peak_memory") is None:
        return None
    unit = (pub.get("peak_memory_unit") or "GiB").strip()
    return float(pub["peak_memory"]) * (1e9 / GIB if unit == "GB" else 1.0)


def exclusion(run: dict[str, Any]) -> list[str]:
    """Why a run is kept out of the fit (empty: fit-eligible)."""
    why = sorted({UNMODELLED[f] for f in run.get("features") or [] if f in UNMODELLED})
    if run.get("fp8") and "FP8 GEMMs" not in why:
        why.append("FP8 GEMMs")
    if run.get("compile") and not any(w.startswith("torch.compile") for w in why):
        why.append("torch.compile (fused elementwise kernels)")
    if (run["layout"].get("cp") or 1) > 1 and "context parallel" not in why:
        why.append("context parallel")
    if run.get("layout_complete", True) is False:
        assumed = sorted(k for k in (run.get("assumptions") or {})
                         if k in ("micro_batch", "recompute", "schedule", "cp"))
        why.append("layout not fully published" + (f" ({', '.join(assumed)})" if assumed else ""))
    return why


def flags(run: dict[str, Any]) -> list[str]:
    """Caveats that do not exclude a run: approximations the comparison rests on."""
    out = []
    if "gpt_block_mapped" in (run.get("features") or []):
        out.append("GPT block as SwiGLU")
    if run.get("compile") is None:
        out.append("compile not stated")
    if run["published"].get("approximate"):
        out.append("published value approximate")
    if any(k in (run.get("assumptions") or {}) for k in ("sharding", "hsdp_group")):
        out.append("sharding assumed")
    if (run.get("derived") or {}).get("method") in ("megatron_gpt_flops", "step_time"):
        out.append("tokens/s derived")
    return out


def estimate_run(run: dict[str, Any], hw: HardwareSpec) -> dict[str, Any]:
    """`estimate` of one run on spec `hw`: predictions and the comparison with the source."""
    model = model_of(run)
    nodes = run["devices"] // run["devices_per_node"]
    est = estimate(model, ClusterSpec(nodes, run["devices_per_node"], hw),
                   {"global_batch": run["global_batch"], "seq_len": run["seq_len"], "headroom": 0.0,
                    "optimizer": run.get("optimizer", "adamw"), "compute_dtype": "bf16"},
                   layout=layout_of(run))
    pub_tps = published_tokens(run, model)
    pred_tps = est.time.tokens_per_s_per_device
    pub_step = run["global_batch"] * run["seq_len"] / (pub_tps * run["devices"])
    mem_pub = published_memory_gib(run)
    mem_pred = est.memory.total / GIB
    return {"id": run["id"], "family": run["hardware"]["family"], "profile": profile_key(run),
            "layout": est.layout if isinstance(est.layout, str) else str(est.layout),
            "plan": est.plan.describe() if est.plan else "",
            "published_tokens_per_s": pub_tps, "predicted_tokens_per_s": pred_tps,
            "published_step_s": pub_step, "predicted_step_s": est.time.step_time,
            "step_error": est.time.step_time / pub_step - 1.0,
            "published_mfu": run["published"].get("mfu"), "predicted_mfu": est.time.mfu,
            "published_memory_gib": mem_pub, "predicted_memory_gib": mem_pred,
            "memory_error": (mem_pred / mem_pub - 1.0) if mem_pub else None,
            "fits": est.feasible, "terms": {k: v for k, v in est.time.terms().items() if v},
            "excluded": exclusion(run), "flags": flags(run)}


# ----------------------------------------------------------------------------------------------
# Split and fit
# ----------------------------------------------------------------------------------------------
def split(runs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(fit ids, held-out ids) over the fit-eligible runs: per profile, sorted by id, alternating
    fit / held-out; a profile with one eligible run puts it in the held-out half."""
    groups: dict[str, list[str]] = {}
    for run in runs:
        if not exclusion(run):
            groups.setdefault(profile_key(run), []).append(run["id"])
    fit_ids, held_ids = [], []
    for _, ids in sorted(groups.items()):
        ids = sorted(ids)
        if len(ids) == 1:
            held_ids += ids
            continue
        fit_ids += ids[0::2]
        held_ids += ids[1::2]
    return fit_ids, held_ids


def calibration_record(run: dict[str, Any]) -> dict[str, Any]:
    """A `raytune-llama calibrate` RESULTS record (docs/planner.md, "Calibration file format")."""
    m = run["model"]
    model = m if isinstance(m, str) else dict(m["hf_config"], _name_or_path=m["name"])
    step = run["global_batch"] * run["seq_len"] / (published_tokens(run) * run["devices"])
    mem = published_memory_gib(run)
    return {"model": model, "hardware": profile_key(run), "nodes": run["devices"] // run["devices_per_node"],
            "devices_per_node": run["devices_per_node"], "seq_len": run["seq_len"],
            "global_batch": run["global_batch"], "layout": layout_of(run), "measured_step_time_s": step,
            "measured_peak_memory_bytes": mem * GIB if mem else None,
            "optimizer": run.get("optimizer", "adamw"), "compute_dtype": "bf16"}


def fit_profiles(runs: list[dict[str, Any]], fit_ids: list[str],
                 rail: bool = False) -> dict[str, tuple[HardwareSpec, dict[str, Any]]]:
    """calibrate() per profile on its fit-half runs, starting from the run's starting profile."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run["id"] in fit_ids:
            by_key.setdefault(profile_key(run), []).append(run)
    fitted = {}
    for key, group in sorted(by_key.items()):
        start = base_hardware(group[0], rail)
        spec, report = calibrate([calibration_record(r) for r in group], hardware=key, profile=start.to_dict())
        fitted[key] = (spec, report)
    return fitted


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _pct(x: float | None, signed: bool = True) -> str:
    if x is None:
        return "-"
    return f"{x:+.0%}" if signed else f"{x:.0%}"


def _stats(errors: list[float]) -> tuple[float | None, float | None, int]:
    vals = [abs(e) for e in errors]
    return (statistics.median(vals) if vals else None, max(vals) if vals else None, len(vals))


def family_table(rows: list[dict[str, Any]], key: str = "step_error") -> list[str]:
    """Median and max |error| per hardware family."""
    out = [f"  {'family':<8} {'runs':>4} {'median':>7} {'max':>7}"]
    for fam in FAMILIES:
        med, mx, n = _stats([r[key] for r in rows if r["family"] == fam and r.get(key) is not None])
        if n:
            out.append(f"  {fam:<8} {n:>4} {_pct(med, False):>7} {_pct(mx, False):>7}")
    med, mx, n = _stats([r[key] for r in rows if r.get(key) is not None])
    if n:
        out.append(f"  {'all':<8} {n:>4} {_pct(med, False):>7} {_pct(mx, False):>7}")
    return out


def run_table(rows: list[dict[str, Any]], halves: dict[str, str]) -> list[str]:
    """One line per run: published vs predicted tokens/s/device, step-time error, MFU, memory."""
    head = (f"{'run':<52} {'half':<5} {'pub tok/s':>9} {'pred':>8} {'err':>6} {'pub MFU':>7} {'pred':>5} "
            f"{'pub GiB':>7} {'pred':>6} {'err':>5}  notes")
    out = [head, "-" * len(head)]
    for r in rows:
        notes = "; ".join((["EXCLUDED: " + ", ".join(r["excluded"])] if r["excluded"] else []) + r["flags"])
        if not r["fits"]:
            notes = (notes + "; " if notes else "") + "does not fit this engine"
        mem_pub = f"{r['published_memory_gib']:.1f}" if r["published_memory_gib"] else "-"
        mem_pred = f"{r['predicted_memory_gib']:.1f}" if r["published_memory_gib"] else "-"
        out.append(f"{r['id']:<52} {halves.get(r['id'], '-'):<5} {r['published_tokens_per_s']:>9.0f} "
                   f"{r['predicted_tokens_per_s']:>8.0f} {_pct(r['step_error']):>6} "
                   f"{_pct(r['published_mfu'], False):>7} {_pct(r['predicted_mfu'], False):>5} "
                   f"{mem_pub:>7} {mem_pred:>6} {_pct(r['memory_error']):>5}  {notes}")
    return out


def evaluate(runs: list[dict[str, Any]], rail: bool = False) -> dict[str, Any]:
    """Predictions on the starting profiles, the split, the fit, and the held-out half before the
    fit, after it (every fitted profile) and with the profiles the planner ships now."""
    rows = [estimate_run(run, base_hardware(run, rail)) for run in runs]
    fit_ids, held_ids = split(runs)
    fitted = fit_profiles(runs, fit_ids, rail)
    by_id = {r["id"]: r for r in runs}
    before = {r["id"]: r for r in rows}
    after, shipped = {}, {}
    for rid in held_ids:
        run = by_id[rid]
        key = profile_key(run)
        after[rid] = estimate_run(run, fitted[key][0] if key in fitted else base_hardware(run, rail))
        shipped[rid] = estimate_run(run, rail_what_if(shipped_hardware(run)) if rail else shipped_hardware(run))
    per_profile = {}
    for key in sorted({profile_key(by_id[i]) for i in held_ids}):
        ids = [i for i in held_ids if profile_key(by_id[i]) == key]
        b = statistics.median(abs(before[i]["step_error"]) for i in ids)
        a = statistics.median(abs(after[i]["step_error"]) for i in ids)
        per_profile[key] = {"held": len(ids), "before": b, "after": a, "fitted": key in fitted,
                            "improves": key in fitted and a < b}
    return {"rows": rows, "fit_ids": fit_ids, "held_ids": held_ids, "fitted": fitted,
            "before": before, "after": after, "shipped": shipped, "per_profile": per_profile}


def _summary(rows: list[dict[str, Any]]) -> str:
    med, mx, n = _stats([r["step_error"] for r in rows])
    return f"median {_pct(med, False)}, max {_pct(mx, False)} over {n}"


def print_fit(ev: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """The split, the fitted knobs, and the held-out errors before / after / as shipped."""
    by_id = {r["id"]: r for r in runs}
    held = ev["held_ids"]
    print(f"\nsplit: {len(ev['fit_ids'])} fit, {len(held)} held out "
          "(per profile, eligible runs sorted by id alternate fit/held; single-run profiles held out)")
    print("\nfitted profiles (calibrate on the fit half):")
    for key, (spec, rep) in ev["fitted"].items():
        knobs = ", ".join(f"{k.split('.')[-1]} {v:.4g}" for k, v in rep["fitted"].items())
        print(f"  {key:<16} {rep['records']} runs; in-sample mean |error| {rep['step_time_error_pct_before']}% -> "
              f"{rep['step_time_error_pct_after']}%; {knobs}" + (f"; at bound: {rep['at_bound']}" if rep["at_bound"] else ""))
    print("\nheld-out half: step-time error, starting profile -> fitted -> as shipped")
    for rid in held:
        b, a, s = ev["before"][rid], ev["after"][rid], ev["shipped"][rid]
        note = "" if profile_key(by_id[rid]) in ev["fitted"] else "  (no fit-half run on this profile)"
        mem = (f"   memory {_pct(b['memory_error'])} -> {_pct(a['memory_error'])} -> {_pct(s['memory_error'])}"
               if b["memory_error"] is not None else "")
        print(f"  {rid:<54} {_pct(b['step_error']):>6} -> {_pct(a['step_error']):>6} -> {_pct(s['step_error']):>6}{mem}{note}")
    for label, table in (("starting profiles", ev["before"]), ("fitted profiles", ev["after"]),
                         ("profiles as shipped", ev["shipped"])):
        print(f"\nheld-out |error| per family, {label}:")
        print("\n".join(family_table([table[i] for i in held])))
    print("\nper profile (held-out median |error|, starting -> fitted):")
    for key, p in ev["per_profile"].items():
        verdict = "improves" if p["improves"] else ("no fit-half run" if not p["fitted"] else "does not improve")
        print(f"  {key:<16} {p['held']} held out: {_pct(p['before'], False)} -> {_pct(p['after'], False)}  {verdict}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA), help="published runs YAML")
    ap.add_argument("--no-fit", action="store_true", help="predictions only, no split and fit")
    ap.add_argument("--rail-what-if", action="store_true",
                    help="also run everything with cross-node bus bandwidth = the node's NIC total (see rail_what_if)")
    ap.add_argument("--json", default=None, help="also write every row and the fit report as JSON here")
    ap.add_argument("--profiles-out", default=None, help="write each fitted profile YAML into this folder")
    args = ap.parse_args(argv)

    runs = load_runs(args.data)
    problems = [p for run in runs for p in check_run(run)]
    if problems:
        print("data file problems:\n  " + "\n  ".join(problems))
        return 2
    if args.no_fit:
        rows = [estimate_run(run, base_hardware(run)) for run in runs]
        ev: dict[str, Any] = {"rows": rows, "fit_ids": [], "held_ids": []}
    else:
        ev = evaluate(runs)
        rows = ev["rows"]
    halves = {i: "fit" for i in ev["fit_ids"]} | {i: "held" for i in ev["held_ids"]}

    print(f"{len(runs)} published runs ({args.data}); starting profiles (as shipped before the fit)\n")
    print("\n".join(run_table(rows, halves)))
    print("\nstep-time |error|, fit-eligible runs, starting profiles:")
    print("\n".join(family_table([r for r in rows if not r["excluded"]])))
    print("\nstep-time |error|, all runs (excluded ones included), starting profiles:")
    print("\n".join(family_table(rows)))
    mem_rows = [r for r in rows if r["memory_error"] is not None]
    if mem_rows:
        print("\npeak memory |error| (runs that publish it), starting profiles:")
        print("\n".join(family_table(mem_rows, "memory_error")))
    result: dict[str, Any] = {"rows": rows, "fit_ids": ev["fit_ids"], "held_ids": ev["held_ids"]}
    if not args.no_fit:
        print_fit(ev, runs)
        if args.profiles_out:
            out = Path(args.profiles_out)
            out.mkdir(parents=True, exist_ok=True)
            for key, (spec, rep) in ev["fitted"].items():
                write_profile(spec, rep, out / f"{key}.yaml")
            print(f"\nfitted profiles written to {out}/")
        result["fitted"] = {k: {"profile": spec.to_dict(), "report": {kk: vv for kk, vv in rep.items() if kk != "runs"}}
                            for k, (spec, rep) in ev["fitted"].items()}
        result.update({"held_out_fitted": ev["after"], "held_out_shipped": ev["shipped"],
                       "per_profile": ev["per_profile"]})
    if args.rail_what_if and not args.no_fit:
        rw = evaluate(runs, rail=True)
        print("\n=== what-if: cross-node bus bandwidth = the node's NIC total (not the planner's model) ===")
        print("fit-eligible runs, starting profiles: " + _summary([r for r in rw["rows"] if not r["excluded"]]))
        print("\n".join(family_table([r for r in rw["rows"] if not r["excluded"]])))
        print_fit(rw, runs)
        result["rail_what_if"] = {"rows": rw["rows"], "held_out_fitted": rw["after"], "per_profile": rw["per_profile"]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
