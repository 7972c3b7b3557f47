"""Does the data path stay flat as the corpus grows? For generated JSONL corpora of the given
sizes, on a local Ray cluster: time until the first global batch can be read by a training
rank (fresh store, and again on resubmission with the store built), peak driver RSS, peak
object-store bytes, build throughput (tokens/s over the whole corpus), and the cost of
resuming at 10% and at 90% of an epoch (a fresh reader: locate the cursor, read one rank's
rows). The bar: the largest corpus within 1.5x of the smallest for first batch, memory and
resume; a line per size and the ratio largest/smallest are printed.

    .venv/bin/python bench/data_scale.py --sizes-mb 50,500,2000 [--num-cpus 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from raytune_llama.config import DataConfig  # noqa: E402
from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER  # noqa: E402

CORPUS = REPO / "examples" / "data" / "tiny_corpus.jsonl"
FILE_MB = 256  # a corpus is written as files of this size, as sharded corpora are
TOK = str(SHIPPED_TOKENIZER)


def write_corpus(out: Path, size_mb: float) -> int:
    """Copies of the bundled corpus, each line with a unique id, until size_mb; returns bytes."""
    lines = CORPUS.read_text().splitlines()
    target, written, n, f, file_bytes, index = size_mb * 2**20, 0, 0, None, 0, 0
    while written < target:
        if f is None or file_bytes >= FILE_MB * 2**20:
            if f is not None:
                f.close()
            f, file_bytes, index = open(out / f"part-{index:04d}.jsonl", "w"), 0, index + 1
        row = json.loads(lines[n % len(lines)])
        line = json.dumps({"id": f"d{n}", "text": row["text"]}) + "\n"
        f.write(line)
        written += len(line)
        file_bytes += len(line)
        n += 1
    f.close()
    return written


class Peaks:
    """Samples this process's RSS and the cluster's object-store use every 0.2 s."""

    def __init__(self):
        self.rss_mb = self.store_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil
        from ray._private.internal_api import memory_summary

        me = psutil.Process()
        while not self._stop.is_set():
            self.rss_mb = max(self.rss_mb, me.memory_info().rss / 2**20)
            try:
                m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
                if m:
                    self.store_mb = max(self.store_mb, float(m.group(1)))
            except Exception:
                pass
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def first_batch(cfg: DataConfig, root: str, global_batch: int, dp_size: int, cpus: int):
    """Seconds from nothing to a rank's first batch in hand; the builder (still running)."""
    from raytune_llama.engine.data.order import SampleOrder
    from raytune_llama.engine.data.store import TokenStore
    from raytune_llama.trainer.batches import rank_batch
    from raytune_llama.trainer.data_pipeline import StoreBuilder, open_token_store, wait_for_first_batch

    start = time.perf_counter()
    store = open_token_store(cfg, TOK, root)
    builder = StoreBuilder(store, TOK, cfg.shuffle_seed, cfg.shuffle, cpus_free=cpus).start()
    wait_for_first_batch(store, cfg, global_batch)
    reader = TokenStore(store.path)  # as a worker opens it
    rank_batch(reader, SampleOrder.for_data(reader, cfg, global_batch), 0, dp_size - 1, dp_size)
    return time.perf_counter() - start, builder, store


def resume_cost(store_path: Path, cfg: DataConfig, global_batch: int, dp_size: int, fraction: float) -> float:
    """A fresh reader resuming at `fraction` of epoch 1: locate, read one rank's rows."""
    from raytune_llama.engine.data.order import SampleOrder
    from raytune_llama.engine.data.store import TokenStore
    from raytune_llama.trainer.batches import rank_batch

    start = time.perf_counter()
    store = TokenStore(store_path)
    order = SampleOrder.for_data(store, cfg, global_batch)
    per_epoch = order.samples_per_epoch()
    cursor = per_epoch + int(fraction * per_epoch) // global_batch * global_batch
    rank_batch(store, order, cursor, dp_size - 1, dp_size)
    return time.perf_counter() - start


def measure(size_mb: float, args) -> dict:
    import ray

    work = Path(tempfile.mkdtemp(prefix="rtl_data_scale_"))
    try:
        (work / "corpus").mkdir()
        written = write_corpus(work / "corpus", size_mb)
        cfg = DataConfig(path=str(work / "corpus"), format="jsonl", seq_len=args.seq_len, id_column="id")
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, _temp_dir="/tmp/raytune_llama_bench",
                 log_to_driver=False)
        try:
            with Peaks() as peaks:
                first_s, builder, store = first_batch(cfg, str(work / "store"), args.global_batch, args.dp,
                                                      args.num_cpus)
                t0 = time.perf_counter()
                builder.join()
                build_s = first_s + time.perf_counter() - t0
            assert builder.error is None, builder.error
            again_s, _, _ = first_batch(cfg, str(work / "store"), args.global_batch, args.dp, args.num_cpus)
        finally:
            ray.shutdown()
        counts = json.loads((store.path / "counts.json").read_text())
        return {"size_mb": round(written / 2**20), "first_batch_s": round(first_s, 2),
                "first_batch_s_store_built": round(again_s, 2),
                "driver_peak_rss_mb": round(peaks.rss_mb), "object_store_peak_mb": peaks.store_mb,
                "tokens_per_s": round(counts["tokens"] / build_s), "chunks": store.num_chunks,
                "resume_s_10pct": round(resume_cost(store.path, cfg, args.global_batch, args.dp, 0.1), 3),
                "resume_s_90pct": round(resume_cost(store.path, cfg, args.global_batch, args.dp, 0.9), 3)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


FLAT = ("first_batch_s", "driver_peak_rss_mb", "object_store_peak_mb", "resume_s_10pct", "resume_s_90pct")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="50,500,2000")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--dp", type=int, default=8, help="data-parallel ranks (the reader reads the last one's rows)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [measure(float(s), args) for s in args.sizes_mb.split(",")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    cols = ["size_mb", "chunks", "first_batch_s", "first_batch_s_store_built", "driver_peak_rss_mb",
            "object_store_peak_mb", "tokens_per_s", "resume_s_10pct", "resume_s_90pct"]
    print(f"{args.num_cpus} CPU(s), seq_len {args.seq_len}, global batch {args.global_batch}, dp {args.dp}")
    print("".join(f"{c:>26}" for c in cols))
    for r in rows:
        print("".join(f"{r[c]:>26,}" if isinstance(r[c], int) else f"{r[c]:>26}" for c in cols))
    small, large = rows[0], rows[-1]
    print(f"\nlargest / smallest corpus ({large['size_mb']} / {small['size_mb']} MB = "
          f"{large['size_mb'] / max(small['size_mb'], 1):.0f}x the data); bar: <= 1.5x")
    for c in FLAT:
        ratio = large[c] / small[c] if small[c] else float("nan") if large[c] else 1.0
        print(f"  {c:<24}{ratio:>8.2f}x  {'ok' if ratio <= 1.5 or large[c] - small[c] < 0.05 else 'NOT FLAT'}")


if __name__ == "__main__":
    main()
