"""Data pipeline throughput: Ray Data read → tokenize → pack into the token store, on the bundled corpus
(replicated to ~50 MB of text) against a plain single-process `datasets.map` tokenization of
the same text, in one invocation. Prints both, the ratio, and how many training devices one
CPU core of the pipeline can feed for Llama 3 70B and 8B on MI250.

    .venv/bin/python bench/data_throughput.py [--target-mb 50] [--num-cpus 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from raytune_llama.config import DataConfig  # noqa: E402
from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, load_tokenizer  # noqa: E402
from raytune_llama.planner.hardware import load_hardware  # noqa: E402
from raytune_llama.planner.model_spec import load_model  # noqa: E402

CORPUS = REPO / "examples" / "data" / "tiny_corpus.jsonl"


def replicate_corpus(out_dir: Path, target_mb: float, files: int) -> int:
    """Write copies of the corpus into `files` JSONL files totalling ~target_mb; returns bytes."""
    blob = CORPUS.read_bytes()
    copies = max(1, round(target_mb * 1e6 / len(blob)))
    per_file = -(-copies // files)
    written, done = 0, 0
    for i in range(files):
        n = min(per_file, copies - done)
        if n <= 0:
            break
        path = out_dir / f"part-{i:03d}.jsonl"
        with open(path, "wb") as f:
            for _ in range(n):
                f.write(blob)
        written += path.stat().st_size
        done += n
    return written


def ray_pipeline(data_dir: Path, seq_len: int, num_cpus: int) -> tuple[int, float]:
    """Tokens and seconds of the project's pipeline: Ray Data builds the whole token store
    (read → tokenize → pack → write chunks), all CPUs given to it."""
    import ray

    from raytune_llama.trainer.data_pipeline import StoreBuilder, open_token_store

    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir="/tmp/raytune_llama_bench", log_to_driver=False)
    store_dir = tempfile.mkdtemp(prefix="rtl_bench_store_")
    try:
        cfg = DataConfig(path=str(data_dir), format="jsonl", seq_len=seq_len, tokenize_batch_size=1024)
        start = time.perf_counter()
        store = open_token_store(cfg, str(SHIPPED_TOKENIZER), store_dir)
        builder = StoreBuilder(store, str(SHIPPED_TOKENIZER), 0, True, cpus_free=num_cpus).start()
        builder.join()
        elapsed = time.perf_counter() - start
        return int(store.counts()["tokens"]), elapsed
    finally:
        ray.shutdown()
        shutil.rmtree(store_dir, ignore_errors=True)


def datasets_baseline(data_dir: Path) -> tuple[int, float]:
    """Tokens and seconds of a plain single-process datasets.map tokenization (no packing)."""
    import datasets

    datasets.disable_progress_bars()
    tok = load_tokenizer(SHIPPED_TOKENIZER)
    cache = tempfile.mkdtemp(prefix="rtl_hf_cache_")
    try:
        start = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=sorted(str(p) for p in data_dir.glob("*.jsonl")),
                                   split="train", cache_dir=cache)
        ds = ds.map(lambda b: {"n": [len(x) + 1 for x in tok(b["text"], add_special_tokens=False)["input_ids"]]},
                    batched=True, batch_size=1024, remove_columns=ds.column_names)
        tokens = sum(ds["n"])  # +1 per document: the EOS the packer adds
        return tokens, time.perf_counter() - start
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def devices_fed(tokens_per_s_per_core: float, seq_len: int) -> list[tuple[str, float, float]]:
    """(model, device tokens/s at 100% MFU on one MI250 GCD, devices one core feeds)."""
    peak = load_hardware("mi250").peak_flops
    rows = []
    for name in ("llama3-70b", "llama3-8b"):
        per_device = peak / load_model(name).model_flops_per_token(seq_len)
        rows.append((name, per_device, tokens_per_s_per_core / per_device))
    return rows


def main() -> None:
    """Run both pipelines on the same replicated corpus and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-mb", type=float, default=50)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--seq-len", type=int, default=1024)
    args = ap.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="rtl_bench_data_"))
    try:
        size = replicate_corpus(data_dir, args.target_mb, files=max(args.num_cpus * 4, 8))
        print(f"corpus: {size / 1e6:.1f} MB of JSONL in {len(list(data_dir.glob('*.jsonl')))} files; "
              f"{args.num_cpus} CPU(s); seq_len {args.seq_len}")
        base_tokens, base_s = datasets_baseline(data_dir)
        ray_tokens, ray_s = ray_pipeline(data_dir, args.seq_len, args.num_cpus)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    base_tps, ray_tps = base_tokens / base_s, ray_tokens / ray_s
    print(f"\n{'pipeline':<46}{'tokens':>14}{'seconds':>10}{'tokens/s':>14}")
    print(f"{'datasets.map tokenize (1 process)':<46}{base_tokens:>14,}{base_s:>10.1f}{base_tps:>14,.0f}")
    print(f"{'Ray Data read+tokenize+pack ({} CPUs)'.format(args.num_cpus):<46}{ray_tokens:>14,}{ray_s:>10.1f}{ray_tps:>14,.0f}")
    print(f"ratio Ray Data / datasets.map: {ray_tps / base_tps:.2f}x (token counts agree: {ray_tokens == base_tokens})")
    per_core = ray_tps / args.num_cpus
    print(f"\nRay Data tokens/s per CPU core: {per_core:,.0f}")
    print(f"{'model':<14}{'device tok/s @100% MFU (MI250 GCD)':>38}{'devices fed per core':>24}")
    for name, per_device, fed in devices_fed(per_core, args.seq_len):
        print(f"{name:<14}{per_device:>38,.0f}{fed:>24,.1f}")


if __name__ == "__main__":
    main()
