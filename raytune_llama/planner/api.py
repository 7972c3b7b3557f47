"""Planner entry points: plan() picks the fastest layout that fits; estimate() predicts one layout.

    from raytune_llama.planner.api import plan, estimate
    res = plan(model="llama3-70b", cluster={"hardware": "mi250", "nodes": 8},
               workload={"global_batch": 512, "seq_len": 1024})
    print(res.to_text()); res.plan  # ParallelPlan
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from raytune_llama.planner import explain
from raytune_llama.planner.cluster import ClusterSpec, as_cluster
from raytune_llama.planner.errors import NoFeasiblePlanError, PlanError
from raytune_llama.planner.memory_model import MemoryBreakdown, memory_breakdown, memory_limit
from raytune_llama.planner.model_spec import ModelSpec, load_model
from raytune_llama.planner.plan import ParallelPlan
from raytune_llama.planner.rules import STRUCTURAL, plan_violations
from raytune_llama.planner.search import Candidate, fits_somewhere, search
from raytune_llama.planner.time_model import TimeBreakdown, step_time
from raytune_llama.planner.workload import Workload, as_workload

N_ALTERNATIVES = 10
GB = 1e9


@dataclass
class PlanResult:
    """The chosen layout, its predictions, the runners-up and the notable rejects."""

    best: Candidate
    alternatives: list[Candidate]
    rejected: list[dict[str, Any]]
    model: ModelSpec
    cluster: ClusterSpec
    workload: Workload
    limit: float
    evaluated: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def plan(self) -> ParallelPlan:
        """The chosen ParallelPlan."""
        return self.best.plan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready result (the `plan --json` object)."""
        cap = self.cluster.hardware.memory_bytes
        b = self.best
        return {
            "plan": b.plan.to_dict(), "layout": b.plan.describe(),
            "memory_per_device_bytes": int(b.memory.total),
            "memory": explain.memory_dict(b.memory, self.limit, cap),
            "step_time_s": b.time.step_time, "tokens_per_s": b.time.tokens_per_s,
            "tokens_per_s_per_device": b.time.tokens_per_s_per_device, "mfu": b.time.mfu,
            "time": explain.time_dict(b.time), "why": explain.why_chosen(b, self.workload),
            "alternatives": [{"plan": a.plan.to_dict(), "layout": a.plan.describe(),
                              "step_time_s": a.time.step_time, "tokens_per_s": a.time.tokens_per_s,
                              "mfu": a.time.mfu, "memory_per_device_bytes": int(a.memory.total),
                              "reason": explain.loss_reason(a, b)} for a in self.alternatives],
            "rejected": self.rejected,
            "model": self.model.to_dict(), "cluster": self.cluster.to_dict(),
            "workload": explain.workload_dict(self.workload, self.model),
            "search": {"evaluated": self.evaluated, "elapsed_s": self.elapsed_s}, "notes": self.notes,
        }

    def to_text(self) -> str:
        """Human-readable report."""
        return explain.render_plan(self)


@dataclass
class Estimate:
    """Predictions for one user-given layout, or why it is infeasible."""

    layout: str
    plan: ParallelPlan | None
    memory: MemoryBreakdown | None
    time: TimeBreakdown | None
    feasible: bool
    reasons: list[str]
    limit: float
    capacity: float
    workload: Workload | None = None
    model: ModelSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready result (the `estimate --json` object)."""
        d: dict[str, Any] = {"layout": self.layout, "feasible": self.feasible, "reasons": self.reasons,
                             "plan": self.plan.to_dict() if self.plan else None}
        if self.workload is not None and self.model is not None:
            d["workload"] = explain.workload_dict(self.workload, self.model)
        if self.memory is not None and self.time is not None:
            d.update({"memory_per_device_bytes": int(self.memory.total),
                      "memory": explain.memory_dict(self.memory, self.limit, self.capacity),
                      "step_time_s": self.time.step_time, "tokens_per_s": self.time.tokens_per_s,
                      "tokens_per_s_per_device": self.time.tokens_per_s_per_device, "mfu": self.time.mfu,
                      "time": explain.time_dict(self.time)})
        return d

    def to_text(self) -> str:
        """Human-readable report."""
        return explain.render_estimate(self)


def _inputs(model: Any, cluster: Any, workload: Any, cluster_kw: Mapping[str, Any],
            workload_kw: Mapping[str, Any]) -> tuple[ModelSpec, ClusterSpec, Workload]:
    return load_model(model), as_cluster(cluster, **cluster_kw), as_workload(workload, **workload_kw)


def smallest_fitting_nodes(model: ModelSpec, cluster: ClusterSpec, workload: Workload, max_nodes: int = 4096) -> int | None:
    """Fewest nodes (same node size and hardware) on which some layout fits, or None."""
    n = cluster.nodes + 1
    while n <= max_nodes:
        trial = ClusterSpec(n, cluster.devices_per_node, cluster.hardware)
        if fits_somewhere(model, trial, workload):
            return n
        n = n + 1 if n < 64 else n + max(1, n // 16)  # coarse steps at large scale
    return None


def _no_fit_error(model: ModelSpec, cluster: ClusterSpec, workload: Workload, detail: str) -> NoFeasiblePlanError:
    nodes = smallest_fitting_nodes(model, cluster, workload)
    hint = (f"use at least {nodes} nodes of {cluster.devices_per_node} {cluster.hardware.name} "
            f"({nodes * cluster.devices_per_node} devices)" if nodes else "use a larger cluster or device")
    if workload.constraints.tp or workload.constraints.pp or not workload.constraints.allow_offload:
        hint += ", or relax --tp/--pp/--no-offload"
    return NoFeasiblePlanError("world_size", cluster.world_size,
                               f"no layout of {model.name} fits in {explain.gib(memory_limit(cluster, workload))} "
                               f"per device ({detail})", hint, smallest_nodes=nodes)


def _rejected(outcome: Any, best: Candidate, shown: set, limit: float) -> list[dict[str, Any]]:
    rej: list[dict[str, Any]] = []
    for kind, (layout, why) in sorted(outcome.rule_rejects.items()):
        rej.append({"kind": kind, "layout": layout, "reason": why})
    # Families where even the smallest-memory variant is out of memory.
    fit_fams = {(c.plan.tp, c.plan.pp) for c in outcome.feasible}
    seen: set = set()
    for plan, mem, _ in sorted(outcome.oom, key=lambda x: (x[1].total, x[0].describe())):
        fam = (plan.tp, plan.pp)
        if fam in fit_fams or fam in seen or len(seen) >= 4:
            continue
        seen.add(fam)
        rej.append({"kind": "oom", "layout": plan.describe(), "plan": plan.to_dict(),
                    "reason": f"out of memory by {(mem.total - limit) / GB:.1f} GB even at its smallest "
                              f"({explain.gib(mem.total)} > {explain.gib(limit)}; dominant: {mem.dominant})"})
    # Layouts that would have been faster but do not fit.
    faster = sorted((x for x in outcome.oom if x[2] is not None and x[2].step_time < best.time.step_time),
                    key=lambda x: (x[2].step_time, x[0].describe()))
    for plan, mem, t in faster[:3]:
        rej.append({"kind": "oom", "layout": plan.describe(), "plan": plan.to_dict(),
                    "reason": f"would be {1 - t.step_time / best.time.step_time:.0%} faster but is out of memory "
                              f"by {(mem.total - limit) / GB:.1f} GB ({explain.gib(mem.total)}; dominant: {mem.dominant})"})
    if not any(r["kind"] == "oom" for r in rej):
        timed = sorted((x for x in outcome.oom if x[2] is not None), key=lambda x: (x[2].step_time, x[0].describe()))
        for plan, mem, t in timed[:1]:  # the fastest layout memory ruled out, for context
            rej.append({"kind": "oom", "layout": plan.describe(), "plan": plan.to_dict(),
                        "reason": f"out of memory by {(mem.total - limit) / GB:.1f} GB ({explain.gib(mem.total)}; "
                                  f"dominant: {mem.dominant}); it would take {t.step_time:.3g} s"})
    # Best member of each other (tp, pp) family: why it lost (bubble, comm, ...).
    fams: dict = {}
    n_slower = 0
    for c in outcome.feasible:
        fams.setdefault((c.plan.tp, c.plan.pp), c)
    for fam, c in sorted(fams.items(), key=lambda kv: kv[1].time.step_time):
        if c is best or c.plan in shown:
            continue
        rej.append({"kind": "slower", "layout": c.plan.describe(), "plan": c.plan.to_dict(),
                    "step_time_s": c.time.step_time, "reason": explain.loss_reason(c, best)})
        n_slower += 1
        if n_slower >= 6:
            break
    return rej


def plan(model: Any, cluster: Any = None, workload: Any = None, **kwargs: Any) -> PlanResult:
    """Pick the fastest layout that fits; kwargs may carry cluster/workload fields directly."""
    t0 = time.perf_counter()
    ckeys = {"hardware", "nodes", "devices_per_node", "profile"}
    m, c, w = _inputs(model, cluster, workload, {k: v for k, v in kwargs.items() if k in ckeys},
                      {k: v for k, v in kwargs.items() if k not in ckeys})
    outcome = search(m, c, w)
    limit = memory_limit(c, w)
    if not outcome.feasible:
        if outcome.oom:
            smallest = min(outcome.oom, key=lambda x: x[1].total)
            detail = (f"smallest needs {explain.gib(smallest[1].total)} with {smallest[0].describe()}; "
                      f"out of memory by {(smallest[1].total - limit) / GB:.1f} GB")
        else:
            detail = "; ".join(sorted(w for _, w in outcome.rule_rejects.values())) or "no legal degrees"
        if not outcome.oom and "dp_batch" in outcome.rule_rejects:
            raise PlanError("global_batch", w.global_batch,
                            f"no data-parallel degree available on {c.world_size} devices divides it ({detail})",
                            "choose a global batch divisible by the data-parallel degree or another world size")
        raise _no_fit_error(m, c, w, detail)
    best = outcome.feasible[0]
    alts: list[Candidate] = []
    groups: set = set()
    for cand in outcome.feasible[1:]:
        p = cand.plan
        key = (p.dp_replicate, p.dp_shard, p.zero_stage, p.tp, p.pp, p.pp_schedule, p.virtual_stages, p.recompute, p.offload)
        if key in groups:
            continue  # one row per layout family: the best micro-batch size of each
        groups.add(key)
        alts.append(cand)
        if len(alts) >= N_ALTERNATIVES:
            break
    notes = []
    if w.seq_len > m.max_position_embeddings:
        notes.append(f"seq_len {w.seq_len} exceeds the model's max_position_embeddings {m.max_position_embeddings}")
    rejected = _rejected(outcome, best, {a.plan for a in alts}, limit)
    return PlanResult(best, alts, rejected, m, c, w, limit, outcome.evaluated, time.perf_counter() - t0, notes)


def parse_layout(text: str) -> dict[str, Any]:
    """Parse 'dp_shard=8,pp=8,micro_batch_size=1,recompute=full' into typed ParallelPlan fields."""
    aliases = {"mbs": "micro_batch_size", "ga": "grad_accum", "zero": "zero_stage", "schedule": "pp_schedule",
               "v": "virtual_stages", "sp": "sequence_parallel"}
    types = {f.name: f.type for f in fields(ParallelPlan)}
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.replace(" ", ",").split(","))):
        if "=" not in item:
            raise PlanError("layout", item, "expected key=value", "e.g. --layout 'dp_shard=8,pp=8,recompute=full'")
        key, val = (s.strip() for s in item.split("=", 1))
        key = aliases.get(key, key)
        if key == "dp":
            out["dp"] = val
            continue
        if key not in types:
            raise PlanError("layout", key, "unknown layout field", f"use one of {sorted(types)} (or dp)")
        t = str(types[key])
        try:
            if "bool" in t:
                out[key] = val.lower() in ("1", "true", "yes", "on", "cpu")
            elif "int" in t:
                out[key] = int(val)
            else:
                out[key] = val
        except ValueError as exc:
            raise PlanError(f"layout.{key}", val, "must be an integer", "e.g. pp=8") from exc
    if "dp" in out:
        try:
            dp = int(out.pop("dp"))
        except ValueError as exc:
            raise PlanError("layout.dp", text, "must be an integer", "e.g. dp=8") from exc
        key = "dp_shard" if out.get("zero_stage", 3 if "dp_replicate" not in out else 0) else "dp_replicate"
        out.setdefault(key, dp)
    return out


def complete_layout(layout: "str | Mapping[str, Any] | ParallelPlan", cluster: ClusterSpec, workload: Workload) -> ParallelPlan:
    """Fill unspecified fields: dp takes the rest of the world (sharded, ZeRO-3, unless zero_stage=0),
    grad_accum completes the global batch, sequence parallel follows tp."""
    if isinstance(layout, ParallelPlan):
        return layout
    d = parse_layout(layout) if isinstance(layout, str) else dict(layout)
    tp, pp = int(d.get("tp", 1)), int(d.get("pp", 1))
    rest = max(1, cluster.world_size // max(1, tp * pp))
    if "dp_shard" not in d and "dp_replicate" not in d:
        if d.get("zero_stage", 3) == 0 or d.get("zero_stage") is None and rest == 1:
            d["dp_replicate"] = rest
        else:
            d["dp_shard"] = rest
    elif "dp_shard" not in d:
        d["dp_shard"] = max(1, rest // int(d["dp_replicate"]))
    elif "dp_replicate" not in d:
        d["dp_replicate"] = max(1, rest // int(d["dp_shard"]))
    if "zero_stage" not in d:
        d["zero_stage"] = 3 if int(d.get("dp_shard", 1)) > 1 else 0
    dp = int(d.get("dp_replicate", 1)) * int(d.get("dp_shard", 1))
    mbs = int(d.setdefault("micro_batch_size", 1))
    if "grad_accum" not in d:
        d["grad_accum"] = max(1, workload.global_batch // max(1, dp * mbs))
    d.setdefault("sequence_parallel", tp > 1)
    if int(d.get("virtual_stages", 1)) > 1:
        d.setdefault("pp_schedule", "interleaved_1f1b")
    if d.get("offload"):
        d.setdefault("backend", "deepspeed")
    try:
        return ParallelPlan.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise PlanError("layout", layout, str(exc), "see ParallelPlan fields") from exc


def estimate(model: Any, cluster: Any = None, workload: Any = None,
             layout: "str | Mapping[str, Any] | ParallelPlan" = "", **kwargs: Any) -> Estimate:
    """Predict memory and step time of one layout, or say why it is infeasible."""
    ckeys = {"hardware", "nodes", "devices_per_node", "profile"}
    m, c, w = _inputs(model, cluster, workload, {k: v for k, v in kwargs.items() if k in ckeys},
                      {k: v for k, v in kwargs.items() if k not in ckeys})
    p = complete_layout(layout, c, w)
    text = layout if isinstance(layout, str) else p.describe()
    violations = plan_violations(m, c, w, p)
    reasons = [v.message for v in violations]
    limit, cap = memory_limit(c, w), c.hardware.memory_bytes
    # No prediction where the layout cannot run at all (rules.STRUCTURAL: wrong world size or
    # global batch, a degree below 1, LoRA on DeepSpeed).
    if any(v.code in STRUCTURAL for v in violations):
        return Estimate(text, p, None, None, False, reasons, limit, cap, w, m)
    mem = memory_breakdown(m, c, w, p)
    t = step_time(m, c, w, p)
    if mem.total > limit:
        reasons.append(f"out of memory by {(mem.total - limit) / GB:.1f} GB ({explain.gib(mem.total)} > "
                       f"{explain.gib(limit)}; dominant: {mem.dominant})")
    return Estimate(text, p, mem, t, not reasons, reasons, limit, cap, w, m)
