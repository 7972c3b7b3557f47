"""Turn predictions into words: why the winner won, why each loser lost, and the text/JSON views."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raytune_llama.planner.memory_model import MemoryBreakdown
from raytune_llama.planner.time_model import TimeBreakdown

if TYPE_CHECKING:
    from raytune_llama.planner.api import Estimate, PlanResult
    from raytune_llama.planner.search import Candidate

GIB = 2**30


def gib(x: float) -> str:
    """Bytes as 'N.N GiB'."""
    return f"{x / GIB:.1f} GiB"


def memory_dict(mem: MemoryBreakdown, limit: float, capacity: float) -> dict[str, Any]:
    """JSON view of a memory breakdown."""
    return {"total": int(mem.total), "limit": int(limit), "capacity": int(capacity),
            "headroom_bytes": int(capacity - mem.total), "dominant": mem.dominant, "stage": mem.stage,
            "state_family": mem.state_family, "phase": mem.phase,
            "breakdown": {k: int(v) for k, v in mem.terms().items()}}


def time_dict(t: TimeBreakdown) -> dict[str, Any]:
    """JSON view of a time breakdown."""
    return {"step_time_s": t.step_time, "tokens_per_s": t.tokens_per_s,
            "tokens_per_s_per_device": t.tokens_per_s_per_device, "mfu": t.mfu, "hfu": t.hfu,
            "bubble_fraction": t.bubble_fraction, "dp_comm_total_s": t.dp_comm_total,
            "breakdown": {k: v for k, v in t.terms().items()}}


def loss_reason(cand: "Candidate", best: "Candidate") -> str:
    """Why a feasible candidate is slower than the winner: the term that grew the most."""
    slower = cand.time.step_time / best.time.step_time - 1.0
    a, b = cand.time.terms(), best.time.terms()
    term = max(a, key=lambda k: (a[k] - b[k], k))
    delta = a[term] - b[term]
    words = {"compute": "less efficient matmuls", "recompute": "more recomputation",
             "tp_comm": "tensor-parallel collectives", "pp_p2p": "pipeline point-to-point",
             "bubble": f"pipeline bubble of {cand.time.bubble_fraction:.0%}",
             "dp_comm_exposed": "exposed data-parallel/FSDP communication",
             "optimizer": "optimizer step", "offload": "CPU offload transfers and host optimizer"}
    if slower <= 1e-9:
        return "ties with the chosen plan (tie broken by fewer model-parallel devices)"
    return f"+{slower:.1%} step time: {words[term]} (+{delta:.3g} s)"


def why_chosen(best: "Candidate") -> list[str]:
    """Sentences on what drives the chosen layout."""
    p, t, m = best.plan, best.time, best.memory
    lines = []
    if p.tp > 1:
        lines.append(f"TP={p.tp} stays inside one node" + (" on one card's GCD pair (fast link)" if p.tp == 2 else ""))
    if p.pp > 1:
        lines.append(f"PP={p.pp} ({p.pp_schedule}) with {p.grad_accum} micro-batches keeps the bubble at {t.bubble_fraction:.0%}")
    if p.zero_stage:
        kind = {1: "ZeRO-1 (optimizer sharded)", 2: "ZeRO-2 (grads+optimizer sharded)", 3: "ZeRO-3/FSDP (all states sharded)"}
        lines.append(f"{kind[p.zero_stage]} over {p.dp_shard} devices" + (f", replicated x{p.dp_replicate}" if p.dp_replicate > 1 else ""))
    if p.offload:
        lines.append("optimizer state offloaded to CPU (DeepSpeed): the states do not fit on the devices otherwise")
    if p.recompute != "none":
        lines.append(f"recompute={p.recompute}: activations of {p.recompute == 'full' and 'all but the layer inputs' or 'norms and SwiGLU'} are recomputed to fit")
    terms = t.terms()
    top = max(terms, key=lambda k: (terms[k], k))
    lines.append(f"step time is dominated by {top} ({terms[top]:.3g} s of {t.step_time:.3g} s); "
                 f"memory by {m.dominant} ({gib(m.terms()[m.dominant])})")
    return lines


def render_plan(res: "PlanResult") -> str:
    """Human-readable report of a plan() result."""
    best = res.best
    lines = [f"model {res.model.name} ({res.model.n_params / 1e9:.2f}B params) on {res.cluster.nodes} x "
             f"{res.cluster.devices_per_node} {res.cluster.hardware.name} ({res.cluster.world_size} devices); "
             f"global batch {res.workload.global_batch} x seq {res.workload.seq_len}",
             "", f"chosen layout: {best.plan.describe()}"]
    lines += _predictions(best.memory, best.time, res.limit, res.cluster.hardware.memory_bytes)
    lines.append("why:")
    lines += [f"  - {s}" for s in why_chosen(best)]
    lines += ["", f"top {len(res.alternatives)} alternatives:",
              f"  {'#':>2} {'step s':>9} {'tok/s':>10} {'MFU':>6} {'mem':>10}  layout / why it lost"]
    for i, alt in enumerate(res.alternatives, 1):
        lines.append(f"  {i:>2} {alt.time.step_time:>9.3f} {alt.time.tokens_per_s:>10.0f} {alt.time.mfu:>6.1%} "
                     f"{gib(alt.memory.total):>10}  {alt.plan.describe()}")
        lines.append(f"  {'':>2} {'':>9} {'':>10} {'':>6} {'':>10}  {loss_reason(alt, best)}")
    if res.rejected:
        lines += ["", "rejected:"]
        lines += [f"  - {r['layout']}: {r['reason']}" for r in res.rejected]
    lines += ["", f"searched {res.evaluated} layouts in {res.elapsed_s * 1000:.0f} ms"]
    lines += [f"note: {n}" for n in res.notes]
    return "\n".join(lines)


def _predictions(mem: MemoryBreakdown, t: TimeBreakdown, limit: float, capacity: float) -> list[str]:
    parts = ", ".join(f"{k} {gib(v)}" for k, v in mem.terms().items() if v > 0)
    return [f"memory per device: {gib(mem.total)} of {gib(capacity)} (limit {gib(limit)} after headroom; "
            f"free {gib(capacity - mem.total)}); dominant term: {mem.dominant}",
            f"  breakdown (pipeline stage {mem.stage}, at its peak: {mem.phase}): {parts}",
            f"step time: {t.step_time:.3f} s   tokens/s: {t.tokens_per_s:,.0f}   "
            f"tokens/s/device: {t.tokens_per_s_per_device:,.1f}   MFU: {t.mfu:.1%} (HFU {t.hfu:.1%})",
            "  breakdown: " + ", ".join(f"{k} {v:.3g} s" for k, v in t.terms().items() if v > 0)
            + f"; bubble {t.bubble_fraction:.0%}"]


def render_estimate(est: "Estimate") -> str:
    """Human-readable report of an estimate() result."""
    lines = [f"layout: {est.plan.describe() if est.plan else est.layout}"]
    if est.memory is not None and est.time is not None:
        lines += _predictions(est.memory, est.time, est.limit, est.capacity)
    lines.append("feasible: yes" if est.feasible else "feasible: NO")
    lines += [f"  - {r}" for r in est.reasons]
    return "\n".join(lines)
