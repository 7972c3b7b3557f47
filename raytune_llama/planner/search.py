"""Layout search: enumerate degree factorizations (tp inside a node, pp <= layers, dp dividing
the global batch), then ZeRO stage / HSDP split, micro-batch (divisors of the per-dp batch only),
schedule, recompute and offload; reject a family on model-state memory (memory_model's
`model_state_bytes`, the same function the memory breakdown uses) before looking at
activations, and stop growing the micro-batch at the first one that does not fit (memory grows
with it; FSDP2 ZeRO-1 also tries grad_accum == 1, where its gradients are sharded at once).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from raytune_llama.planner.cluster import ClusterSpec
from raytune_llama.planner.memory_model import (MemoryBreakdown, memory_breakdown, memory_limit, model_state_peak,
                                                 state_family)
from raytune_llama.planner.model_spec import ModelSpec
from raytune_llama.planner.plan import ParallelPlan
from raytune_llama.planner.rules import can_sequence_parallel, layout_violations, tp_violations
from raytune_llama.planner.time_model import TimeBreakdown, step_time
from raytune_llama.planner.workload import Workload

GB = 1e9
MAX_MBS = 64
VIRTUAL_STAGES = (2, 4, 8)


@dataclass(frozen=True)
class Candidate:
    """A legal layout with its predictions."""

    plan: ParallelPlan
    memory: MemoryBreakdown
    time: TimeBreakdown

    def sort_key(self) -> tuple:
        """Fastest first; ties go to fewer model-parallel devices, less sharding, then the text."""
        p = self.plan
        return (round(self.time.step_time, 9), p.tp * p.pp, p.zero_stage, p.offload, p.describe())


@dataclass
class SearchOutcome:
    """All feasible candidates (sorted) and notes on what was rejected."""

    feasible: list[Candidate] = field(default_factory=list)
    rule_rejects: dict[str, tuple[str, str]] = field(default_factory=dict)
    """reason kind -> (example layout, sentence)."""
    oom: list[tuple[ParallelPlan, MemoryBreakdown, TimeBreakdown | None]] = field(default_factory=list)
    """Smallest-memory variant of each (tp, pp, dp split, zero, offload) family that did not fit."""
    evaluated: int = 0


def divisors(n: int) -> list[int]:
    """Positive divisors of n, ascending."""
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i * i != n:
                large.append(n // i)
        i += 1
    return small + large[::-1]


def degree_options(model: ModelSpec, cluster: ClusterSpec, workload: Workload,
                   out: SearchOutcome) -> list[tuple[int, int, int]]:
    """Legal (tp, pp, dp) triples; the first illegal example of each kind is recorded."""
    world = cluster.world_size
    c = workload.constraints
    triples = []
    for tp in divisors(world):
        if c.tp is not None and tp != c.tp:
            continue
        why = tp_violations(model, tp, cluster.devices_per_node)
        if why:
            out.rule_rejects.setdefault(why[0].code, (f"tp={tp}", why[0].message))
            continue
        for pp in divisors(world // tp):
            if c.pp is not None and pp != c.pp:
                continue
            if pp > model.num_layers:
                out.rule_rejects.setdefault("pp_layers", (f"tp={tp} pp={pp}", f"pipeline degree ({pp}) exceeds the layers ({model.num_layers})"))
                continue
            dp = world // (tp * pp)
            if workload.global_batch % dp:
                out.rule_rejects.setdefault("dp_batch", (
                    f"tp={tp} pp={pp} dp={dp}",
                    f"data-parallel degree ({dp}) does not divide the global batch ({workload.global_batch})"))
                continue
            triples.append((tp, pp, dp))
    return triples


def shard_options(cluster: ClusterSpec, workload: Workload, tp: int, pp: int, dp: int) -> list[tuple[int, int, int, bool, str]]:
    """(dp_replicate, dp_shard, zero_stage, offload, backend) choices for one degree triple; no
    DeepSpeed layout for LoRA (the engine refuses it)."""
    opts: list[tuple[int, int, int, bool, str]] = []
    c = workload.constraints
    deepspeed_ok = not workload.lora
    if c.backend != "deepspeed":
        opts.append((dp, 1, 0, False, "torch"))
    if dp == 1:
        return opts
    # Full sharding, plus HSDP splits whose shard group stays within a few nodes.
    shards = [d for d in divisors(dp) if d > 1 and (d == dp or d * tp * pp <= 8 * cluster.devices_per_node)]
    for d in shards:
        for z in (1, 2, 3):
            if c.backend != "deepspeed":
                opts.append((dp // d, d, z, False, "torch"))
            if tp == 1 and pp == 1 and d == dp and deepspeed_ok:
                if c.backend == "deepspeed":
                    opts.append((1, d, z, False, "deepspeed"))
                if c.allow_offload and c.backend in (None, "deepspeed"):
                    opts.append((1, d, z, True, "deepspeed"))
    return opts


def schedule_options(pp: int) -> list[tuple[str, int]]:
    """(schedule, virtual stages) choices for a pipeline degree; the ones a micro-batch count or
    the model's depth rules out are dropped by rules.layout_violations."""
    if pp == 1:
        return [("1f1b", 1)]
    return [("1f1b", 1), ("gpipe", 1)] + [("interleaved_1f1b", v) for v in VIRTUAL_STAGES]


def family_floor(model: ModelSpec, cluster: ClusterSpec, workload: Workload, base: ParallelPlan,
                 mbs_opts: list[int], limit: float) -> tuple[bool, ParallelPlan, MemoryBreakdown, int]:
    """Whether the smallest-memory member of a layout family fits: (fits, that member, its memory,
    breakdowns computed). `base` is the family at micro-batch 1 with full recompute; model states
    are checked first, with the same model_state_bytes the breakdown adds up."""
    per_dp = base.micro_batch_size * base.grad_accum
    variants = [base]
    if state_family(base) == "fsdp_zero1" and per_dp > 1 and per_dp in mbs_opts:
        # grad_accum == 1: no micro-batch runs without gradient sync, so no unsharded accumulators.
        variants.append(replace(base, micro_batch_size=per_dp, grad_accum=1))
    states = min(model_state_peak(model, v, workload) for v in variants)
    if states + cluster.hardware.runtime_reserved_bytes > limit:
        return False, base, memory_breakdown(model, cluster, workload, base), 1
    mems = [(memory_breakdown(model, cluster, workload, v), v) for v in variants]
    mem, plan = min(mems, key=lambda x: x[0].total)
    return mem.total <= limit, plan, mem, len(mems)


def search(model: ModelSpec, cluster: ClusterSpec, workload: Workload) -> SearchOutcome:
    """Evaluate every legal layout that survives memory pruning; candidates come back sorted."""
    out = SearchOutcome()
    limit = memory_limit(cluster, workload)
    c = workload.constraints
    recomputes = [c.recompute] if c.recompute else ["none", "selective", "full"]
    lora_dropout = 0.0 if workload.lora else None
    for tp, pp, dp in degree_options(model, cluster, workload, out):
        per_dp = workload.global_batch // dp
        mbs_opts = [b for b in divisors(per_dp) if b <= MAX_MBS]
        sp = can_sequence_parallel(model, tp)
        for rep, shard, zero, offload, backend in shard_options(cluster, workload, tp, pp, dp):
            base = ParallelPlan(dp_replicate=rep, dp_shard=shard, zero_stage=zero, tp=tp, sequence_parallel=sp,
                                pp=pp, micro_batch_size=1, grad_accum=per_dp, recompute="full",
                                offload=offload, backend=backend)
            # Cheapest-memory variant first: if even it does not fit, the whole family is out.
            fits, smallest_plan, smallest, n = family_floor(model, cluster, workload, base, mbs_opts, limit)
            out.evaluated += n
            if not fits:
                out.oom.append((smallest_plan, smallest, None))
                continue
            # FSDP2 ZeRO-1's gradients shrink at grad_accum == 1: try it even after a smaller
            # micro-batch stopped fitting.
            ga1_last = state_family(base) == "fsdp_zero1" and mbs_opts[-1] == per_dp
            for recompute in recomputes:
                i = 0
                while i < len(mbs_opts):
                    mbs = mbs_opts[i]
                    ga = per_dp // mbs
                    fits_any = False
                    for sched, v in schedule_options(pp):
                        plan = ParallelPlan(dp_replicate=rep, dp_shard=shard, zero_stage=zero, tp=tp,
                                            sequence_parallel=sp, pp=pp, pp_schedule=sched, virtual_stages=v,
                                            micro_batch_size=mbs, grad_accum=ga, recompute=recompute,
                                            offload=offload, backend=backend)
                        broken = layout_violations(model, plan, lora_dropout=lora_dropout)
                        if broken:
                            out.rule_rejects.setdefault(broken[0].code, (plan.describe(), broken[0].message))
                            continue
                        mem = memory_breakdown(model, cluster, workload, plan)
                        out.evaluated += 1
                        if mem.total > limit:
                            if mbs == 1 and sched == "1f1b":
                                out.oom.append((plan, mem, step_time(model, cluster, workload, plan)))
                            continue
                        fits_any = True
                        out.feasible.append(Candidate(plan, mem, step_time(model, cluster, workload, plan)))
                    if not fits_any:
                        if ga1_last and i < len(mbs_opts) - 1:
                            i = len(mbs_opts) - 1
                            continue
                        break  # activation memory only grows with the micro-batch
                    i += 1
    out.feasible.sort(key=Candidate.sort_key)
    return out


def fits_somewhere(model: ModelSpec, cluster: ClusterSpec, workload: Workload) -> bool:
    """Whether any layout's minimum-memory variant fits (cheap: no time model)."""
    limit = memory_limit(cluster, workload)
    scratch = SearchOutcome()
    for tp, pp, dp in degree_options(model, cluster, workload, scratch):
        per_dp = workload.global_batch // dp
        mbs_opts = [b for b in divisors(per_dp) if b <= MAX_MBS]
        for rep, shard, zero, offload, backend in shard_options(cluster, workload, tp, pp, dp):
            plan = ParallelPlan(dp_replicate=rep, dp_shard=shard, zero_stage=zero, tp=tp,
                                sequence_parallel=can_sequence_parallel(model, tp), pp=pp, micro_batch_size=1,
                                grad_accum=per_dp,
                                recompute=workload.constraints.recompute or "full", offload=offload, backend=backend)
            if family_floor(model, cluster, workload, plan, mbs_opts, limit)[0]:
                return True
    return False
