"""Sharded checkpoint cost per rank: save, verify and load N GB of model + optimizer state over
R ranks (gloo, CPU) with the production code (engine/checkpoint.py, engine/checkpoint_io.py), and
what that means for Llama 3 70B on 64 ranks.

    .venv/bin/python bench/checkpoint_scale.py                 # 2 GB over 4 ranks
    .venv/bin/python bench/checkpoint_scale.py --gb 4 --ranks 4 --dir /mnt/shared/tmp --json

Each rank holds GB/R of fp32 state (its "model" and "optimizer" shards, as a sharded layout
does) and, in one spawned gloo group, all ranks writing into one shared folder as a run on a
filesystem `run.storage_path` does (trainer/checkpoint_report.py): `save_sharded_training_state`
(DCP write of its shards, SHA-256 computed while writing, nothing read back; its rank manifest),
`choose_checkpoint` (each rank hashes its share of the files, the verdicts are gathered) and
`load_sharded_training_state` (DCP read back into its shards). Times are per rank (the slowest
rank is what a step waits for). The 70B extrapolation scales the measured per-rank rates to
70.6e9 parameters x 12 B (fp32 masters + AdamW moments; bf16 compute copies are not saved) over
64 ranks, sharing `--node-gbps` of storage bandwidth per node of 8 ranks, and compares the
slowest phase with `run.collective_timeout_s` (default 600 s): every phase ends in a collective
(DCP's gather after the writes, the verdicts' all_gather, DCP's gather after the reads) that
waits for the slowest rank's own I/O, about 1/64 of the checkpoint. It also states the storage
bandwidth per node below which that wait would exceed the timeout.
Written files go under --dir (default: a temporary folder) and are deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9
PARAMS_70B = 70.6e9
STATE_BYTES_PER_PARAM = 4 + 4 + 4  # fp32 master, exp_avg, exp_avg_sq (what a checkpoint holds)
RANKS_70B, RANKS_PER_NODE = 64, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, per_rank_bytes: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from raytune_llama.engine.checkpoint import load_sharded_training_state, save_sharded_training_state
    from raytune_llama.engine.checkpoint_io import choose_checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = per_rank_bytes // 4 // 3  # fp32 elements per tensor: master, exp_avg, exp_avg_sq
        key = f"layers.{rank}.weight"
        model = {key: torch.randn(n)}
        optim = {"state": {key: {"step": torch.tensor(1.0), "exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)}},
                 "param_groups": [{"lr": 1e-4, "params": [key]}]}
        ckpt = Path(root) / "checkpoint_000001"  # shared by all ranks (a shared filesystem)
        times = {}
        dist.barrier()
        t, read = time.perf_counter(), _bytes_read()
        save_sharded_training_state(ckpt, model=model, optimizer=optim, meta={"step": 1}, rank=rank, world_size=world)
        times["save_s"] = time.perf_counter() - t
        times["save_read_gb"] = (_bytes_read() - read) / GB  # what the save read back (hashing)
        dist.barrier()
        t = time.perf_counter()
        chosen, refused = choose_checkpoint([ckpt])
        times["verify_s"] = time.perf_counter() - t
        assert chosen == ckpt and not refused, refused
        model[key].zero_()
        dist.barrier()
        t = time.perf_counter()
        load_sharded_training_state(ckpt, model=model, optimizer=optim, verify=False)
        times["load_s"] = time.perf_counter() - t
        own = json.loads((ckpt / f"MANIFEST.rank{rank}.json").read_text())["files"]
        assert all(name.startswith(f"__{rank}_") for name in own if name.endswith(".distcp")), own
        Path(f"{out}{rank}.json").write_text(json.dumps({"rank": rank, "bytes": n * 4 * 3, **times}))
    finally:
        dist.destroy_process_group()


def _bytes_read() -> int:
    """Bytes this process has read through read(2)-family calls, page-cache hits included
    (/proc/self/io rchar; 0 where there is no /proc)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except OSError:
        return 0


def measure(total_gb: float, ranks: int, directory: str | None) -> dict:
    import torch.multiprocessing as mp

    per_rank = int(total_gb * GB / ranks)
    with tempfile.TemporaryDirectory(dir=directory, prefix="ckpt-scale-") as root:
        out = os.path.join(root, "result_rank")
        mp.spawn(_worker, args=(ranks, _free_port(), root, per_rank, out), nprocs=ranks, join=True)
        rows = [json.loads(Path(f"{out}{r}.json").read_text()) for r in range(ranks)]
        shutil.rmtree(Path(root) / "checkpoint_000001", ignore_errors=True)
    slowest = {k: max(r[k] for r in rows) for k in ("save_s", "verify_s", "load_s")}
    per_rank_gb = rows[0]["bytes"] / GB
    rates = {k.replace("_s", "_gbps_per_rank"): per_rank_gb / v for k, v in slowest.items()}
    return {"total_gb": total_gb, "ranks": ranks, "per_rank_gb": per_rank_gb, **slowest, **rates,
            "save_read_gb_per_rank": max(r["save_read_gb"] for r in rows)}


def extrapolate_70b(result: dict, node_gbps: float, timeout_s: float, ranks: int = RANKS_70B,
                    ranks_per_node: int = RANKS_PER_NODE) -> dict:
    """Per-rank seconds for a 70B checkpoint: the measured per-rank rate, or the node's storage
    bandwidth shared by its ranks, whichever is slower; whether a phase nears the collective
    timeout; and the storage bandwidth per node at which one phase would take the whole timeout."""
    per_rank_gb = PARAMS_70B * STATE_BYTES_PER_PARAM / GB / ranks
    share = node_gbps / ranks_per_node
    phases = {}
    for phase in ("save", "verify", "load"):
        rate = min(result[f"{phase}_gbps_per_rank"], share)
        phases[f"{phase}_s"] = per_rank_gb / rate
    worst = max(phases.values())
    return {"checkpoint_gb": PARAMS_70B * STATE_BYTES_PER_PARAM / GB, "ranks": ranks, "per_rank_gb": per_rank_gb,
            "node_gbps": node_gbps, **phases, "worst_s": worst, "timeout_s": timeout_s,
            "timeout_margin": timeout_s / worst,
            "min_node_gbps_for_timeout": per_rank_gb * ranks_per_node / timeout_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="total state over all ranks, GB")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--node-gbps", type=float, default=2.0,
                    help="storage bandwidth per node for the 70B extrapolation, GB/s (default 2)")
    ap.add_argument("--timeout-s", type=float, default=_default_timeout_s(),
                    help="run.collective_timeout_s to check against (default: the config's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = measure(args.gb, args.ranks, args.dir)
    big = extrapolate_70b(result, args.node_gbps, args.timeout_s)
    if args.json:
        print(json.dumps({"measured": result, "llama3_70b_64_ranks": big}, indent=1))
        return 0
    print(f"measured: {result['total_gb']:.1f} GB over {result['ranks']} ranks ({result['per_rank_gb']:.2f} GB each), "
          f"slowest rank:")
    print(f"  {'phase':<8}{'seconds':>10}{'GB/s per rank':>16}")
    for phase in ("save", "verify", "load"):
        print(f"  {phase:<8}{result[f'{phase}_s']:>10.2f}{result[f'{phase}_gbps_per_rank']:>16.2f}")
    print(f"  the save read back {result['save_read_gb_per_rank']:.3f} GB per rank (hashes are computed while writing)")
    print(f"Llama 3 70B, 64 ranks ({big['checkpoint_gb']:.0f} GB of fp32 masters + AdamW moments, "
          f"{big['per_rank_gb']:.1f} GB per rank), {args.node_gbps:g} GB/s of storage per 8-rank node:")
    for phase in ("save", "verify", "load"):
        print(f"  {phase:<8}{big[f'{phase}_s']:>10.1f} s")
    verdict = "safe" if big["timeout_margin"] >= 2 else "AT RISK: raise run.collective_timeout_s or add bandwidth"
    print(f"  slowest phase {big['worst_s']:.0f} s against the {big['timeout_s']:.0f} s collective timeout "
          f"(margin {big['timeout_margin']:.1f}x): {verdict}")
    print(f"  a phase would take the whole timeout below {big['min_node_gbps_for_timeout']:.2f} GB/s of storage "
          f"per {RANKS_PER_NODE}-rank node")
    return 0


def _default_timeout_s() -> float:
    from raytune_llama.config import RunConfig

    return float(RunConfig().collective_timeout_s)


if __name__ == "__main__":
    sys.exit(main())
