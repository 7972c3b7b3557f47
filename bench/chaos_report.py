"""Chaos report: inject worker kills (0, 1 and 3 per run), a stalled rank and a corrupted
checkpoint into short training runs on a local Ray cluster, and print one table: faults
injected, faults survived, documents lost, documents duplicated (by the exactly-once audit of
document ids over the committed steps), checkpoints rejected as corrupt, time to recover.
A fault-free run of the same config is the baseline, in the same invocation.

    .venv/bin/python bench/chaos_report.py [--steps 24]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from raytune_llama.config import load_config  # noqa: E402
from raytune_llama.testing.fault_injection import WorkerKiller, checkpoint_dirs  # noqa: E402
from raytune_llama.trainer.llama_trainer import LlamaTrainer  # noqa: E402

LAYOUT = 'parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"'


def config(tmp: Path, name: str, steps: int, *extra: str):
    """Tiny model, 2 workers, checkpoint every 2 steps."""
    return load_config(REPO / "examples/configs/tiny_cpu.yaml", [
        f"model.name_or_path={tmp}/models/tiny-llama", f"data.path={REPO}/examples/data/tiny_corpus.jsonl",
        f"run.storage_path={tmp}/runs", f"run.name={name}", f"train.max_steps={steps}",
        "train.global_batch_size=8", "data.seq_len=64", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
        "train.log_every=2", "run.max_failures=5", "data.id_column=id", LAYOUT, *extra])


def kill_run(address: str, tmp: Path, name: str, steps: int, kills: int) -> dict:
    """One run with `kills` worker SIGKILLs; returns the row of the table."""
    killer = WorkerKiller(address, tmp / "runs" / name, kills=kills, every=2, seed=kills)
    if kills:
        killer.start()
    summary = LlamaTrainer(config(tmp, name, steps)).fit()
    killer.stop()
    starts = summary["worker_group_start_times"][1:]
    recover = [s - k for k, s in zip(killer.kill_times, starts)]
    return {"summary": summary, "injected": len(killer.kill_times), "survived": summary["restarts"],
            "rejected": 0, "recover_s": statistics.mean(recover) if recover else None}


def corrupt_run(tmp: Path, steps: int) -> dict:
    """Stop halfway, flip a byte in the newest checkpoint, resume."""
    first = LlamaTrainer(config(tmp, "corrupt", steps, f"train.stop_after_steps={steps // 2}")).fit()
    newest = sorted(checkpoint_dirs(tmp / "runs" / "corrupt"))[-1]
    # the largest data file: model.pt (full format) or a rank's .distcp shard (sharded)
    path = max((p for p in (tmp / "runs" / "corrupt" / newest).iterdir()
                if p.is_file() and not p.name.startswith("MANIFEST")), key=lambda p: p.stat().st_size)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    second = LlamaTrainer(config(tmp, "corrupt", steps)).fit()
    rejected = (first["final_step"] - second["resumed_at_steps"][0]) // 2
    resumed = second["resumed_at_steps"][0]
    kept = [ids for step, ids in first["data_audit"]["by_step"] if step <= resumed]
    ids = [i for step_ids in kept for i in step_ids] + second["data_audit"]["ids"]
    merged = dict(second, data_audit={"ids": ids},
                  losses=first["losses"][:resumed] + second["losses"],
                  steps_redone=first["final_step"] - second["resumed_at_steps"][0])
    return {"summary": merged, "injected": 1, "survived": 1 if second["final_step"] == steps else 0,
            "rejected": rejected, "recover_s": None}


def stall_run(tmp: Path, steps: int) -> dict:
    """Rank 1 sleeps in step 8 as if stuck in a collective; the 5 s step bound ends it. (Not a
    step right after a checkpoint: that one keeps run.collective_timeout_s, 600 s, because
    its peers may wait there for rank 0's checkpoint upload.)"""
    os.environ["RAYTUNE_LLAMA_STALL"] = "rank=1,step=8,seconds=600"
    try:
        summary = LlamaTrainer(config(tmp, "stall", steps, "run.step_timeout_s=5")).fit()
    finally:
        del os.environ["RAYTUNE_LLAMA_STALL"]
    starts, stalls = summary["worker_group_start_times"][1:], summary["stalls"]
    # from the moment the rank stopped making progress to the new worker group running
    recover = starts[0] - (stalls[0]["time"] - stalls[0]["waited_s"]) if starts and stalls else None
    return {"summary": summary, "injected": 1, "survived": summary["restarts"], "rejected": 0,
            "recover_s": recover}


def documents_lost_and_duplicated(summary: dict, baseline: dict) -> tuple[int, int]:
    """Against the fault-free run's audit: document ids missing, and ids trained on twice."""
    ids, ref = summary["data_audit"]["ids"], baseline["data_audit"]["ids"]
    return len(set(ref) - set(ids)), len(ids) - len(set(ids))


def main() -> None:
    """Run the scenarios and print the table."""
    import ray

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    ray.init(num_cpus=4, include_dashboard=True, _temp_dir="/tmp/raytune_llama_chaos", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    tmp = Path(tempfile.mkdtemp(prefix="rtl_chaos_"))
    try:
        base = kill_run(address, tmp, "kills-0", args.steps, 0)
        rows = {"no faults": base, "1 worker kill": kill_run(address, tmp, "kills-1", args.steps, 1),
                "3 worker kills": kill_run(address, tmp, "kills-3", args.steps, 3),
                "rank stalled in a step": stall_run(tmp, args.steps),
                "corrupt newest checkpoint": corrupt_run(tmp, args.steps)}
    finally:
        ray.shutdown()
    ref = base["summary"]
    print(f"\n{'scenario':<28}{'injected':>9}{'survived':>9}{'final step':>11}{'docs lost':>10}"
          f"{'duplicated':>11}{'rejected ckpt':>14}{'steps redone':>13}{'recover s':>10}{'losses = baseline':>19}")
    for name, row in rows.items():
        s = row["summary"]
        lost, duplicated = documents_lost_and_duplicated(s, ref)
        same = all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(s["losses"], ref["losses"]))
        rec = f"{row['recover_s']:.1f}" if row["recover_s"] is not None else "-"
        print(f"{name:<28}{row['injected']:>9}{row['survived']:>9}{s['final_step']:>11}{lost:>10}"
              f"{duplicated:>11}{row['rejected']:>14}{s['steps_redone']:>13}{rec:>10}{str(same):>19}")


if __name__ == "__main__":
    main()
