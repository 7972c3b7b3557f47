"""The dry run against a real device: one engine.train_step of a slice of Llama 3 8B that fits one
device (a few decoder layers at full width, the full 128K vocabulary, bf16 compute, fp32 master
weights) run for real, its peak next to the dry run's measured peak for the same plan and shapes
(engine/dryrun/, docs/planner.md "How the planner is checked").

    python bench/dryrun_gpu_check.py                          # on a GPU: torch.cuda.max_memory_allocated
    python bench/dryrun_gpu_check.py --device cpu --smoke     # anywhere: real CPU tensors, tracked
    python bench/dryrun_gpu_check.py --layers 4 --seq 4096 --mbs 1,2 --recompute selective,full --json

Each row: the dry run (fake tensors, CPU, a spawned process) and the real step (this process, one
rank of a world of 1, the same ParallelEngine code; weights random) for one micro-batch size and
recompute mode. On a GPU the real peak is `torch.cuda.max_memory_allocated()` over the step after
`reset_peak_memory_stats()`, with the parameters and AdamW moments already allocated (as in the dry
run); it also holds what no tensor tracker sees (cuBLAS / attention workspaces), so expect the real
peak a little above the dry run. On the CPU the real peak is tracked by the same tensor tracker as
the dry run's, so the two must agree almost exactly: fake tensors allocate what real ones do.
Needs torch and transformers only (no Ray, no network).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
SMOKE = dict(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=688, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_step(cfg: dict, plan, seq: int, device: str) -> dict:
    """One engine.train_step in this process on `device` (world of 1, random weights): peak bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raytune_llama.engine.dryrun import fake_world
    from raytune_llama.engine.dryrun.run import create_optimizer_state
    from raytune_llama.engine.parallel import ParallelEngine

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    data = dict(cfg)
    hf = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    engine = ParallelEngine(model, plan, device=device, lr=1e-5, max_grad_norm=1.0, mixed_precision="bf16")
    try:
        create_optimizer_state(engine)
        rows = plan.micro_batch_size * plan.grad_accum
        ids = torch.randint(0, hf.vocab_size, (rows, seq))
        batch = {"input_ids": ids, "labels": ids.clone()}
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            engine.train_step(batch)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            how = "torch.cuda.max_memory_allocated"
        else:
            tracker = fake_world.memory_tracker(engine.modules, engine.optimizer)
            with tracker:
                engine.train_step(batch)
            peak = max(s["Total"] for s in tracker.get_tracker_snapshot("peak").values())
            how = "tensor tracker on real CPU tensors"
    finally:
        engine.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return {"peak_bytes": int(peak), "how": how}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", default="1,2", help="micro-batch sizes, comma-separated")
    ap.add_argument("--recompute", default="selective,full", help="recompute modes, comma-separated")
    ap.add_argument("--smoke", action="store_true", help="a small model (256 wide, 2 layers, 2K vocab)")
    ap.add_argument("--json", action="store_true", help="print one JSON list")
    args = ap.parse_args(argv)

    import torch

    from raytune_llama.engine.dryrun import dry_run_isolated
    from raytune_llama.planner.plan import ParallelPlan

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dict(SMOKE if args.smoke else LLAMA3_8B, num_hidden_layers=2 if args.smoke else args.layers)
    seq = min(args.seq, 256) if args.smoke else args.seq
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    rows = []
    for mode in args.recompute.split(","):
        for mbs in (int(m) for m in args.mbs.split(",")):
            plan = ParallelPlan(micro_batch_size=mbs, grad_accum=1, recompute=mode)
            dry = dry_run_isolated(cfg, plan, rank=0, world_size=1, seq_len=seq, mixed_precision="bf16",
                                   master_weights="fp32", hardware="h100")
            try:
                real = real_step(cfg, plan, seq, device)
            except torch.OutOfMemoryError as exc:
                real = {"peak_bytes": None, "how": f"out of memory: {exc}".splitlines()[0]}
            if device == "cuda":
                torch.cuda.empty_cache()
            dry_peak = dry["measured_peak_bytes"]["total"]
            rows.append({"device": card, "layers": cfg["num_hidden_layers"], "seq": seq, "mbs": mbs,
                         "recompute": mode, "dry_run_peak_bytes": dry_peak, "real_peak_bytes": real["peak_bytes"],
                         "real_measured_by": real["how"],
                         "planner_tensor_bytes": dry["predicted_bytes"]["tensor_total"],
                         "real_over_dry": (real["peak_bytes"] / dry_peak) if real["peak_bytes"] else None})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    shapes = "smoke shapes" if args.smoke else "Llama 3 8B shapes"
    print(f"device {card}; {shapes}, {cfg['num_hidden_layers']} layers, seq {seq}, bf16 compute, "
          f"fp32 masters; real peak: {rows[0]['real_measured_by']}")
    print(f"{'recompute':>10} {'mbs':>4} {'dry run GiB':>12} {'real GiB':>10} {'real/dry':>9} {'planner GiB':>12}")
    for r in rows:
        real = f"{r['real_peak_bytes'] / GIB:10.3f}" if r["real_peak_bytes"] else f"{'OOM':>10}"
        ratio = f"{r['real_over_dry']:9.3f}" if r["real_over_dry"] else f"{'-':>9}"
        print(f"{r['recompute']:>10} {r['mbs']:>4} {r['dry_run_peak_bytes'] / GIB:12.3f} {real} {ratio} "
              f"{r['planner_tensor_bytes'] / GIB:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
