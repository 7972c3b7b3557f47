"""Document packing against naive packing (and one document per row) on the bundled data, in
one invocation: the same tiny Llama, the same engine (one process, gloo), the same global
batch; what changes is how the documents fill the rows. Prints per packing mode the
non-padding tokens/s of training (the throughput the run reports), the share of each row that
is padding, and the loss targets per step, then the ratio of each mode to naive.

Document packing pays twice: rows end early where the next document does not fit (padding,
which costs compute and counts nowhere), and SDPA takes an explicit block-diagonal mask
instead of its causal fast path. Naive packing wastes nothing but lets attention cross
documents. The numbers say how much each costs on this machine.

    .venv/bin/python bench/packing_throughput.py [--rounds 6 --steps 5] [--data chat|text|instruction]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from raytune_llama.config import load_config  # noqa: E402
from raytune_llama.engine.data.order import SampleOrder  # noqa: E402
from raytune_llama.engine.data.store import build_all  # noqa: E402
from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER  # noqa: E402
from raytune_llama.trainer.batches import model_inputs, rank_batch  # noqa: E402
from raytune_llama.trainer.data_pipeline import open_token_store  # noqa: E402

CONFIGS = {"chat": "examples/configs/tiny_chat.yaml", "instruction": "examples/configs/tiny_instruction.yaml",
           "text": "examples/configs/tiny_cpu.yaml"}


class Mode:
    """One packing mode's store, order and engine, and what it measured so far."""

    def __init__(self, mode: str, data, model_dir: str, root: Path, batch: int):
        from raytune_llama.engine.model_io import build_engine
        from raytune_llama.planner.plan import ParallelPlan

        self.mode, self.batch, self.step = mode, batch, 0
        data = dataclasses.replace(data, packing=mode, eval_fraction=0.0, id_column=None)
        self.store = build_all(open_token_store(data, str(SHIPPED_TOKENIZER), root / mode).path,
                               str(SHIPPED_TOKENIZER))
        self.order = SampleOrder(self.store, batch, seed=0, shuffle=True)
        self.engine = build_engine(model_dir, ParallelPlan(micro_batch_size=batch), device_type="cpu", lr=1e-3,
                                   weight_decay=0.0, betas=(0.9, 0.95), max_grad_norm=1.0, mixed_precision=None)
        self.tokens = self.targets = self.seconds = self.steps = 0

    def run(self, steps: int, record: bool) -> None:
        for _ in range(steps):
            b = rank_batch(self.store, self.order, self.step * self.batch, 0, 1)
            self.step += 1
            inputs = model_inputs(b.rows)
            start = time.perf_counter()
            out = self.engine.train_step(inputs)
            if record:
                self.seconds += time.perf_counter() - start
                self.tokens += b.global_tokens
                self.targets += out["tokens"]
                self.steps += 1

    def result(self) -> dict:
        counts = self.store.counts()
        return {"mode": self.mode, "tokens_per_s": self.tokens / self.seconds,
                "padding": 1 - counts["tokens"] / (counts["total_rows"] * self.store.seq_len),
                "targets_per_step": self.targets / self.steps, "rows": counts["total_rows"],
                "split_docs": counts.get("split_docs", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="rounds of --steps steps per mode, modes interleaved")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--data", choices=sorted(CONFIGS), default="chat")
    args = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.manual_seed(0)
    cfg = load_config(REPO / CONFIGS[args.data])
    from raytune_llama.engine.model_io import create_random_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(create_random_model(Path(tmp) / "model", "tiny-llama"))
        modes = [Mode(m, cfg.data, model_dir, Path(tmp), 16) for m in ("naive", "documents", "none")]
        for m in modes:
            m.run(args.warmup, record=False)
        for _ in range(args.rounds):  # interleaved, so that a change in the machine's load hits every mode
            for m in modes:
                m.run(args.steps, record=True)
        rows = [m.result() for m in modes]
    base = rows[0]["tokens_per_s"]
    print(f"data {CONFIGS[args.data]} ({cfg.data.row_format}), seq_len {cfg.data.seq_len}, batch 16, "
          f"{args.rounds} x {args.steps} steps per mode (interleaved) after {args.warmup} warm-up, tiny-llama, "
          f"1 CPU process")
    print(f"{'packing':<10} {'tokens/s':>10} {'vs naive':>9} {'padding':>8} {'targets/step':>13} {'rows':>7} {'split docs':>11}")
    for r in rows:
        print(f"{r['mode']:<10} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s'] / base:>8.2f}x {r['padding']:>7.1%} "
              f"{r['targets_per_step']:>13,.0f} {r['rows']:>7,} {r['split_docs']:>11,}")


if __name__ == "__main__":
    main()
