"""Planner speed: in-process plan() time and a cold CLI call (fresh interpreter) per scenario.

    .venv/bin/python bench/planner_speed.py

Quality bars: 70B on 64 devices < 0.5 s; 405B on 16,384 H100 < 5 s (cold CLI call).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raytune_llama.planner.api import plan  # noqa: E402

SCENARIOS = [
    # (model, hardware, nodes, seq_len, global_batch)
    ("llama3-8b", "h100", 1, 4096, 64),
    ("llama3-70b", "mi250", 8, 1024, 512),
    ("llama3-70b", "h100", 32, 8192, 256),
    ("llama3.1-405b", "h100", 2048, 8192, 2048),
]


def main() -> None:
    """Print one row per scenario: layouts evaluated, in-process and cold-CLI seconds, the plan."""
    print(f"{'model':<14} {'hw':<6} {'devices':>7} {'evaluated':>9} {'plan() s':>9} {'cold CLI s':>10}  chosen")
    for model, hw, nodes, s, gb in SCENARIOS:
        t0 = time.perf_counter()
        res = plan(model, {"hardware": hw, "nodes": nodes}, {"global_batch": gb, "seq_len": s})
        warm = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "raytune_llama.cli.plan_commands", "plan", "--model", model, "--hardware", hw,
               "--nodes", str(nodes), "--seq-len", str(s), "--global-batch", str(gb), "--json"]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        cold = time.perf_counter() - t0
        print(f"{model:<14} {hw:<6} {res.cluster.world_size:>7} {res.evaluated:>9} {warm:>9.3f} {cold:>10.3f}  "
              f"{res.plan.describe()}")


if __name__ == "__main__":
    main()
