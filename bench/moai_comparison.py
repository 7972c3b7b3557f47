"""Our plan vs the MoAI Llama3-70B tutorial layout on 64 MI250 GCDs (global batch 512, seq 1024).

    .venv/bin/python bench/moai_comparison.py

MoAI chose 8 pipeline stages x DP 8, 64 micro-batches of 1, full recompute, sharded parameters,
no TP. "Sharded parameters" is read two ways: ZeRO-3 (re-gathered every micro-batch) and ZeRO-1.
Both are estimated as this project's engine would run them (FSDP2 under pipeline parallel); the
`fits` column compares the predicted peak with the usable memory (64 GiB less 5% headroom).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raytune_llama.planner.api import estimate, plan  # noqa: E402

CLUSTER = {"hardware": "mi250", "nodes": 8, "devices_per_node": 8}
WORKLOAD = {"global_batch": 512, "seq_len": 1024}


def main() -> None:
    """Print predicted step time, tokens/s, MFU and memory of our plan and of MoAI's layout."""
    ours = plan("llama3-70b", CLUSTER, WORKLOAD)
    rows = [("ours (plan)", ours.plan.describe(), ours.best.time, ours.best.memory.total, True)]
    limit = None
    for name, layout in (("MoAI, ZeRO-3 reading", "dp_shard=8,zero_stage=3,pp=8,micro_batch_size=1,recompute=full"),
                         ("MoAI, ZeRO-1 reading", "dp_shard=8,zero_stage=1,pp=8,micro_batch_size=1,recompute=full")):
        e = estimate("llama3-70b", CLUSTER, WORKLOAD, layout=layout)
        rows.append((name, e.plan.describe(), e.time, e.memory.total, e.feasible))
        limit = e.limit
    print(f"{'who':<22} {'step s':>8} {'tokens/s':>9} {'MFU':>6} {'mem GiB':>8} {'fits':>5}  layout")
    for name, desc, t, mem, fits in rows:
        print(f"{name:<22} {t.step_time:>8.1f} {t.tokens_per_s:>9.0f} {t.mfu:>6.1%} {mem / 2**30:>8.1f} "
              f"{'yes' if fits else 'NO':>5}  {desc}")
    print(f"usable memory per device: {limit / 2**30:.1f} GiB; plan() took {ours.elapsed_s:.3f} s")


if __name__ == "__main__":
    main()
