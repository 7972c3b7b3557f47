"""Our plan vs the MoAI Llama3-70B tutorial layout on 64 MI250 GCDs (global batch 512, seq 1024).

    .venv/bin/python bench/moai_comparison.py

MoAI chose 8 pipeline stages x DP 8, 64 micro-batches of 1, full recompute, sharded parameters,
no TP. "Sharded parameters" is read two ways: ZeRO-3 (re-gathered every micro-batch) and ZeRO-1.
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
    rows = [("ours (plan)", ours.plan.describe(), ours.best.time, ours.best.memory.total)]
    for name, layout in (("MoAI, ZeRO-3 reading", "dp_shard=8,zero_stage=3,pp=8,micro_batch_size=1,recompute=full"),
                         ("MoAI, ZeRO-1 reading", "dp_shard=8,zero_stage=1,pp=8,micro_batch_size=1,recompute=full")):
        e = estimate("llama3-70b", CLUSTER, WORKLOAD, layout=layout)
        rows.append((name, e.plan.describe(), e.time, e.memory.total))
    print(f"{'who':<22} {'step s':>8} {'tokens/s':>9} {'MFU':>6} {'mem GiB':>8}  layout")
    for name, desc, t, mem in rows:
        print(f"{name:<22} {t.step_time:>8.1f} {t.tokens_per_s:>9.0f} {t.mfu:>6.1%} {mem / 2**30:>8.1f}  {desc}")


if __name__ == "__main__":
    main()
