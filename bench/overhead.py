"""Engine overhead: ParallelEngine's data-parallel step (dp_replicate=2, zero_stage=0) vs a plain
hand-written DDP loop (DistributedDataParallel + AdamW + mean-over-tokens CE + clip 1.0) on the
same tiny Llama, same 2 gloo processes (1 thread each), same data, interleaved step by step.

    TORCH_EXTENSIONS_DIR=.cache/torch_extensions .venv/bin/python bench/overhead.py [--steps 30] [--profile] [--hf-cache]

Prints median step times (and the phase split: zero_grad / forward+backward / clip+optimizer),
the ratio ours/plain (goal <= 1.05) and, with --profile, the top ops of each loop on rank 0.
Step time per step = max over the 2 ranks (each step starts after a barrier).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORLD = 2
SEED = 1234
ROWS_PER_RANK = 4
SEQ = 128
VOCAB = 512
HP = dict(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), max_grad_norm=1.0)


def bench_config():
    """Tiny Llama: hidden 256, 4 layers, 8 heads / 4 kv heads, vocab 512 (GQA, SDPA)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ,
                       tie_word_embeddings=False, attn_implementation="sdpa")


def make_batches(n: int) -> list[dict]:
    """Unpadded random global batches of WORLD*ROWS_PER_RANK rows x SEQ tokens."""
    g = torch.Generator().manual_seed(SEED + 1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (WORLD * ROWS_PER_RANK, SEQ), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class PlainDDP:
    """The hand-written baseline: DDP(HF model) + AdamW (decay / no-decay groups) + clip_grad_norm_."""

    def __init__(self, model, use_cache: bool = False):
        from torch.nn.parallel import DistributedDataParallel

        self.use_cache = use_cache
        self.ddp = DistributedDataParallel(model)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": HP["weight_decay"]},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=HP["lr"], betas=HP["betas"], eps=1e-8)

    def zero_grad(self):
        """Drop the gradients."""
        self.opt.zero_grad(set_to_none=True)

    def forward_backward(self, batch) -> float:
        """Mean CE over non-ignored (shifted) tokens of this rank's rows; DDP averages grads."""
        ids, labels = batch["input_ids"], batch["labels"]
        # use_cache=False: HF otherwise fills a DynamicCache (K/V copies) even in training.
        logits = self.ddp(input_ids=ids, use_cache=self.use_cache).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        return float(loss.item())

    def optimizer_step(self) -> float:
        """Clip to 1.0 and step."""
        gn = torch.nn.utils.clip_grad_norm_(self.ddp.parameters(), HP["max_grad_norm"])
        self.opt.step()
        return float(gn)


class Ours:
    """ParallelEngine with plan dp_replicate=2, zero_stage=0 (classic DDP inside)."""

    def __init__(self, model):
        from raytune_llama.engine.parallel import ParallelEngine
        from raytune_llama.planner.plan import ParallelPlan

        plan = ParallelPlan(dp_replicate=WORLD, zero_stage=0, micro_batch_size=ROWS_PER_RANK, grad_accum=1)
        self.eng = ParallelEngine(model, plan, device="cpu", mixed_precision=None, **HP)

    def zero_grad(self):
        """Drop the gradients (what train_step does first)."""
        self.eng.optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, batch) -> float:
        """engine.forward_backward (token all-reduce, fwd/bwd, loss all-reduce)."""
        return self.eng.forward_backward(batch)["loss"]

    def optimizer_step(self) -> float:
        """engine.optimizer_step (global-norm clip + AdamW)."""
        return self.eng.optimizer_step()


def _timed_step(runner, batch) -> tuple[list[float], float]:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    runner.zero_grad()
    t1 = time.perf_counter()
    loss = runner.forward_backward(batch)
    t2 = time.perf_counter()
    runner.optimizer_step()
    t3 = time.perf_counter()
    return [t3 - t0, t1 - t0, t2 - t1, t3 - t2], loss


def _worker(rank: int, port: int, steps: int, warmup: int, profile: bool, hf_cache: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(SEED)
    base = LlamaForCausalLM(bench_config()).float()
    runners = {"ours": Ours(copy.deepcopy(base)), "plain": PlainDDP(copy.deepcopy(base), hf_cache)}
    batches = make_batches(warmup + steps)
    lo, hi = rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK
    times: dict[str, list] = {k: [] for k in runners}
    losses: dict[str, list] = {k: [] for k in runners}
    for i, batch in enumerate(batches):
        local = {k: v[lo:hi] for k, v in batch.items()}
        order = list(runners) if i % 2 == 0 else list(runners)[::-1]  # interleave, alternate who goes first
        for name in order:
            dt, loss = _timed_step(runners[name], local)
            t = torch.tensor(dt, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the step lasts as long as its slowest rank
            lt = torch.tensor([loss], dtype=torch.float64)
            dist.all_reduce(lt)
            if i >= warmup:
                times[name].append(t.tolist())
            # plain reports its local mean: average over ranks (equal token counts, no padding)
            losses[name].append(float(lt) / WORLD if name == "plain" else loss)
    prof_tables = {}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprof

        for name, runner in runners.items():
            with tprof(activities=[ProfilerActivity.CPU]) as prof:
                for batch in batches[:4]:
                    _timed_step(runner, {k: v[lo:hi] for k, v in batch.items()})
            prof_tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"times": times, "losses": losses, "profile": prof_tables}, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """Spawn 2 gloo ranks, run both loops interleaved, print medians and the ratio."""
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="measured steps per loop")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler top ops (rank 0)")
    ap.add_argument("--hf-cache", action="store_true", help="plain loop leaves HF's use_cache default (True)")
    args = ap.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.json")
        mp.spawn(_worker, args=(_free_port(), args.steps, args.warmup, args.profile, args.hf_cache, out), nprocs=WORLD, join=True)
        res = json.load(open(out))
    cfg = bench_config()
    from raytune_llama.planner.model_spec import from_hf_config

    spec = from_hf_config(cfg.to_dict())
    tokens = WORLD * ROWS_PER_RANK * (SEQ - 1)  # non-ignored target tokens per step (no padding)
    flops = spec.model_flops_per_token(SEQ) * WORLD * ROWS_PER_RANK * SEQ
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in res["times"].items()}
    print(f"model: {spec.n_params / 1e6:.2f}M params, {WORLD} gloo ranks x 1 thread, {ROWS_PER_RANK} x {SEQ} "
          f"tokens per rank, fp32; {args.steps} measured steps each (after {args.warmup} warm-up), interleaved; "
          f"plain loop use_cache={args.hf_cache}")
    print(f"{'loop':<6} {'step ms':>8} {'p10-p90 ms':>13} {'zero_grad':>9} {'fwd+bwd':>8} {'clip+opt':>8} "
          f"{'tok/s':>8} {'GFLOP/s':>8} {'last loss':>10}")
    for name in ("ours", "plain"):
        steps = sorted(r[0] for r in res["times"][name])
        p10, p90 = steps[len(steps) // 10], steps[(9 * len(steps)) // 10]
        m = med[name]
        print(f"{name:<6} {1e3 * m[0]:8.1f} {1e3 * p10:6.1f}-{1e3 * p90:<6.1f} {1e3 * m[1]:9.2f} {1e3 * m[2]:8.1f} "
              f"{1e3 * m[3]:8.1f} {tokens / m[0]:8.0f} {flops / m[0] / 1e9:8.2f} {res['losses'][name][-1]:10.6f}")
    ratio = med["ours"][0] / med["plain"][0]
    pair = [a[0] / b[0] for a, b in zip(res["times"]["ours"], res["times"]["plain"])]
    print(f"ratio ours/plain (median step): {ratio:.3f}   median of per-step ratios: {statistics.median(pair):.3f}"
          f"   goal <= 1.05: {'MET' if ratio <= 1.05 else 'NOT MET'}")
    dl = max(abs(a - b) for a, b in zip(res["losses"]["ours"], res["losses"]["plain"]))
    print(f"max |loss ours - loss plain| over all steps: {dl:.2e} (same math, same data)")
    for name, table in res["profile"].items():
        print(f"\n--- torch.profiler, {name}, rank 0, 4 steps ---\n{table}")


if __name__ == "__main__":
    main()
