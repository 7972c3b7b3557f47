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
    seq_len: int
    docs_skipped: int = 0
    """Source rows that were not usable text (empty, missing, not a string)."""
    has_doc_ids: bool = False
    """Rows carry the ids of the documents starting in them (data.id_column)."""


@lru_cache(maxsize=4)
def _tokenizer(path: str, eos_token_id: int, pad_token_id: int):
    from pathlib import Path

    from raytune_llama.engine.tokenizer_build import BackendTokenizer, load_tokenizer

    if (Path(path) / "tokenizer.json").is_file():
        return BackendTokenizer(Path(path) / "tokenizer.json", eos_token_id, pad_token_id)
    return load_tokenizer(path)  # slow (Python) tokenizers only exist through transformers


def tokenize_pack_batch(batch, *, tokenizer_path: str, eos_token_id: int, pad_token_id: int,
                        text_column: str, seq_len: int, id_column: str | None = None):
    """map_batches function: one batch of documents (an Arrow table) → packed rows (numpy
    dict). The text column is read as raw bytes, so invalid UTF-8 is decoded with
    replacement characters instead of failing the conversion to Python strings."""
    import logging

    import pyarrow as pa

    from raytune_llama.engine.packing import tokenize_and_pack

    tokenizer = _tokenizer(tokenizer_path, eos_token_id, pad_token_id)
    texts = batch.column(text_column)
    if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.binary() if pa.types.is_string(texts.type) else pa.large_binary())
    ids = batch.column(id_column).to_pylist() if id_column else None
    packed, skipped = tokenize_and_pack(tokenizer, texts.to_pylist(), seq_len, doc_ids=ids)
    if skipped and not len(packed["num_tokens"]):
        # No row to carry the count on: say so here (the total in the run summary misses these).
        logging.getLogger(__name__).warning("a batch of %d rows had no usable text; all skipped", skipped)
    return packed


def read_source(cfg: DataConfig):
    """The raw documents as a Ray Dataset, keeping only the text column."""
    import ray.data

    fmt = resolve_format(cfg.path, cfg.format)
    if fmt == "jsonl":
        # pyarrow's JSON reader (the default) parses newline-delimited JSON natively and is far
        # faster than the pandas reader that lines=True selects.
        ds = ray.data.read_json(cfg.path)
    elif fmt == "parquet":
        ds = ray.data.read_parquet(cfg.path)
    elif fmt == "hf":
        ds = _from_hf(cfg)
    else:
        raise ValueError(f"data.format: cannot read {cfg.path!r} as {fmt!r}; set data.format to jsonl, parquet or hf")
    return ds.select_columns([cfg.text_column] + ([cfg.id_column] if cfg.id_column else []))


def _from_hf(cfg: DataConfig):
    """An HF `datasets` dataset (hub name or local folder) as a Ray Dataset."""
    import datasets
    import ray.data

    hf = datasets.load_dataset(cfg.path, split=cfg.hf_split)
    columns = hf.column_names or []
    if columns and cfg.text_column not in columns:
        raise ValueError(
            f"data.text_column: column {cfg.text_column!r} is not in the HF dataset {cfg.path!r} "
            f"(columns: {sorted(columns)}); set data.text_column to one of them"
        )
    if isinstance(hf, datasets.Dataset):
        # The same Arrow conversion ray.data.from_huggingface falls back to for a local
        # dataset, minus its Hub probe, which reloads the data by builder name ("json",
        # "parquet") from the current directory and can take minutes offline.
        table = hf.select_columns([c for c in (cfg.text_column, cfg.id_column) if c]).with_format("arrow")[:]
        blocks = max(1, min(64, table.num_rows // max(cfg.tokenize_batch_size, 1)))
        return ray.data.from_arrow(table, override_num_blocks=blocks)
    return ray.data.from_huggingface(hf)  # streaming IterableDataset


def build_packed_dataset(cfg: DataConfig, tokenizer_path: str):
    """Read, tokenize and pack; returns (materialized dataset, DatasetInfo)."""
    import ray.data

    from raytune_llama.engine.tokenizer_build import load_tokenizer

    tok = load_tokenizer(tokenizer_path)  # once, on the driver: the special-token ids
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the global cursor indexes this order
    ctx.enable_progress_bars = False  # the driver prints its own progress line
    # Each tokenize batch packs its own documents, so the rows depend on where batches start.
    # Blocks of exactly tokenize_batch_size documents (in order; streaming, no shuffle) make
    # every batch start at a multiple of it: the packed order then depends on the documents
    # alone, not on how Ray split the read (which follows the CPUs it sees: the same corpus
    # once packed into 8,904 rows on a 2-CPU and 8,905 on a 5-CPU cluster) or on the format.
    # The global cursor indexes this order, so a run resumed on a cluster of another shape
    # gets exactly the same rows.
    source = read_source(cfg).repartition(target_num_rows_per_block=cfg.tokenize_batch_size, strict=True)
    ds = source.map_batches(
        tokenize_pack_batch,
        fn_kwargs={"tokenizer_path": tokenizer_path, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id, "text_column": cfg.text_column, "seq_len": cfg.seq_len,
                   "id_column": cfg.id_column},
        batch_size=cfg.tokenize_batch_size,
        batch_format="pyarrow",
    )
    try:
        ds = ds.materialize()
    except Exception as exc:  # a bad file fails inside a Ray Data task: name it on the driver
        cause = getattr(exc, "cause", None) or exc
        raise ValueError(
            f"data.path: could not read and tokenize {cfg.path!r} as {resolve_format(cfg.path, cfg.format)} "
            f"({type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}); every row needs a text "
            f"string in column {cfg.text_column!r} (rows with an empty or missing one are skipped and counted)"
        ) from exc
    num_samples = ds.count()
    if num_samples == 0:
        raise ValueError(f"data.path: {cfg.path!r} produced no training sequences (empty dataset, or no "
                         f"row with text in column {cfg.text_column!r})")
    # Token totals are counted by the workers as they train: an aggregate over the whole
    # dataset here would cost a second pass before the first step. The skipped-row count is
    # one small column of the materialized blocks.
    skipped = int(ds.sum("docs_skipped") or 0)
    return ds, DatasetInfo(num_samples, cfg.seq_len, skipped, bool(cfg.id_column))
