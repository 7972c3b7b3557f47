"""Ray Data pipeline: read (JSONL, Parquet or an HF dataset) → tokenize and pack in
`map_batches` with a fast tokenizer → materialize once, in a fixed order.

The packed dataset is materialized before training starts, so its order is fixed (the
global sample cursor indexes into it) and no data task competes with the training workers
for CPUs while they run."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from raytune_llama.config import DataConfig
from raytune_llama.config_checks import resolve_format


@dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline produced."""

    num_samples: int
    num_tokens: int
    seq_len: int


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from raytune_llama.engine.tokenizer_build import load_tokenizer

    return load_tokenizer(path)


def tokenize_pack_batch(batch, *, tokenizer_path: str, text_column: str, seq_len: int):
    """map_batches function: one batch of documents → packed rows (numpy dict)."""
    from raytune_llama.engine.packing import tokenize_and_pack

    packed, _skipped = tokenize_and_pack(_tokenizer(tokenizer_path), batch[text_column], seq_len)
    return packed


def read_source(cfg: DataConfig):
    """The raw documents as a Ray Dataset, keeping only the text column."""
    import ray.data

    fmt = resolve_format(cfg.path, cfg.format)
    if fmt == "jsonl":
        ds = ray.data.read_json(cfg.path, lines=True) if not cfg.path.endswith(".json") else ray.data.read_json(cfg.path)
    elif fmt == "parquet":
        ds = ray.data.read_parquet(cfg.path)
    elif fmt == "hf":
        import datasets

        ds = ray.data.from_huggingface(datasets.load_dataset(cfg.path, split=cfg.hf_split))
    else:
        raise ValueError(f"data.format: cannot read {cfg.path!r} as {fmt!r}; set data.format to jsonl, parquet or hf")
    return ds.select_columns([cfg.text_column])


def build_packed_dataset(cfg: DataConfig, tokenizer_path: str):
    """Read, tokenize and pack; returns (materialized dataset, DatasetInfo)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the global cursor indexes this order
    ctx.enable_progress_bars = False  # the driver prints its own progress line
    ds = read_source(cfg).map_batches(
        tokenize_pack_batch,
        fn_kwargs={"tokenizer_path": tokenizer_path, "text_column": cfg.text_column, "seq_len": cfg.seq_len},
        batch_size=cfg.tokenize_batch_size,
        batch_format="numpy",
    ).materialize()
    num_samples = ds.count()
    if num_samples == 0:
        raise ValueError(f"data.path: {cfg.path!r} produced no training sequences (empty dataset?)")
    return ds, DatasetInfo(num_samples, int(ds.sum("num_tokens")), cfg.seq_len)
