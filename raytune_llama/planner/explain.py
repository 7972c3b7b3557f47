"""Turn predictions into words: why the winner won, why each loser lost, and the text/JSON views."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raytune_llama.planner.memory_model import MemoryBreakdown
from raytune_llama.planner.time_model import TimeBreakdown

if TYPE_CHECKING:
    from raytune_llama.planner.api import Estimate, PlanResult
    from raytune_llama.planner.model_spec import ModelSpec
    from raytune_llama.planner.search import Candidate
    from raytune_llama.planner.workload import Workload

GIB = 2**30


def gib(x: float) -> str:
    """Bytes as 'N.N GiB'."""
    return f"{x / GIB:.1f} GiB"


def size(x: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB (the small LoRA and mask terms)."""
    return gib(x) if x >= GIB else f"{x / 2**20:.1f} MiB"


def memory_dict(mem: MemoryBreakdown, limit: float, capacity: float) -> dict[str, Any]:
    """JSON view of a memory breakdown. `lora` (frozen base bytes inside params; adapter weights,
    grads and optimizer state inside params + grads + optimizer) and `attention_mask` (bytes
    inside activations) split terms of `breakdown`; they do not add to the total."""
    return {"total": int(mem.total), "limit": int(limit), "capacity": int(capacity),
            "headroom_bytes": int(capacity - mem.total), "dominant": mem.dominant, "stage": mem.stage,
            "state_family": mem.state_family, "phase": mem.phase,
            "breakdown": {k: int(v) for k, v in mem.terms().items()},
            "lora": ({"frozen_base": int(mem.frozen_base), "adapters": int(mem.adapters),
                      "adapter_params_local": int(mem.adapter_params_local)} if mem.adapter_params_local else None),
            "attention_mask": int(mem.attention_mask)}


def workload_dict(w: "Workload", model: "ModelSpec") -> dict[str, Any]:
    """JSON view of a workload (with the model's LoRA adapter count)."""
    return {"global_batch": w.global_batch, "seq_len": w.seq_len, "optimizer": w.optimizer,
            "compute_dtype": w.compute_dtype, "headroom": w.constraints.headroom,
            "lora_rank": w.lora_rank, "lora_targets": list(w.lora_targets) if w.lora else [],
            "lora_params": model.lora_params(w.lora_rank, w.lora_targets),
            "trainable_params": model.lora_params(w.lora_rank, w.lora_targets) if w.lora else model.n_params,
            "attention_mask": w.attention_mask}


def workload_lines(w: "Workload", model: "ModelSpec") -> list[str]:
    """What trains and how attention is masked, when not full fine-tuning with a causal mask."""
    lines = []
    if w.lora:
        n = model.lora_params(w.lora_rank, w.lora_targets)
        lines.append(f"LoRA r={w.lora_rank} on {','.join(w.lora_targets)}: {n / 1e6:.1f}M trainable adapter "
                     f"params ({n / model.n_params:.2%}); base frozen in {w.compute_dtype}, no gradients or "
                     f"optimizer state for it")
    if w.attention_mask == "documents":
        lines.append(f"attention: documents (block-diagonal causal mask: bool [mbs, 1, {w.seq_len}, {w.seq_len}] per "
                     f"micro-batch, SDPA's per-layer copies; attention timed as causal)")
    return lines


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


def why_chosen(best: "Candidate", workload: "Workload | None" = None) -> list[str]:
    """Sentences on what drives the chosen layout."""
    p, t, m = best.plan, best.time, best.memory
    lines = []
    if workload is not None and workload.lora:
        shards = f", sharded over {p.dp_shard}" if p.zero_stage and p.dp_shard > 1 else ""
        lines.append(f"LoRA: the frozen base costs {workload.compute_bytes} B/param{shards} and no gradients or "
                     f"optimizer state; backward runs input-gradient GEMMs only")
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
             f"global batch {res.workload.global_batch} x seq {res.workload.seq_len}"]
    lines += workload_lines(res.workload, res.model)
    lines += ["", f"chosen layout: {best.plan.describe()}"]
    lines += _predictions(best.memory, best.time, res.limit, res.cluster.hardware.memory_bytes)
    lines.append("why:")
    lines += [f"  - {s}" for s in why_chosen(best, res.workload)]
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
    split = []
    if mem.adapter_params_local:
        split += [f"frozen base {size(mem.frozen_base)} (in params)",
                  f"adapters + grads + optimizer {size(mem.adapters)}"]
    if mem.attention_mask:
        split.append(f"attention mask {size(mem.attention_mask)} (in activations)")
    lines = [f"memory per device: {gib(mem.total)} of {gib(capacity)} (limit {gib(limit)} after headroom; "
             f"free {gib(capacity - mem.total)}); dominant term: {mem.dominant}",
             f"  breakdown (pipeline stage {mem.stage}, at its peak: {mem.phase}): {parts}"]
    if split:
        lines.append(f"  of which: {', '.join(split)}")
    return lines + [f"step time: {t.step_time:.3f} s   tokens/s: {t.tokens_per_s:,.0f}   "
                    f"tokens/s/device: {t.tokens_per_s_per_device:,.1f}   MFU: {t.mfu:.1%} (HFU {t.hfu:.1%})",
                    "  breakdown: " + ", ".join(f"{k} {v:.3g} s" for k, v in t.terms().items() if v > 0)
                    + f"; bubble {t.bubble_fraction:.0%}"]


def render_estimate(est: "Estimate") -> str:
    """Human-readable report of an estimate() result."""
    lines = [f"layout: {est.plan.describe() if est.plan else est.layout}"]
    if est.workload is not None and est.model is not None:
        lines += workload_lines(est.workload, est.model)
    if est.memory is not None and est.time is not None:
        lines += _predictions(est.memory, est.time, est.limit, est.capacity)
    lines.append("feasible: yes" if est.feasible else "feasible: NO")
    lines += [f"  - {r}" for r in est.reasons]
    return "\n".join(lines)
