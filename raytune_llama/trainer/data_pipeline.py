"""The data pipeline on the Ray cluster: the corpus → a persistent packed token store, built by
Ray Data in the background while training runs (docs/data.md).

The driver lists the corpus's chunks (file sizes and Parquet footers only), opens the store
keyed by content + tokenizer + seq_len under `data.store_dir` (default
`{run.storage_path}/token_store`), and starts a Ray Data job that tokenizes every chunk not
built yet, in epoch 0's order. Only chunk metadata flows through the object store; each task
holds one tokenize batch of documents. Training starts as soon as the first global batch's
chunks exist, and workers read their own rows straight from the store's files."""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from raytune_llama import console
from raytune_llama.config import DataConfig
from raytune_llama.config_paths import needed_columns, resolve_reader
from raytune_llama.engine.data.order import SampleOrder, chunk_order
from raytune_llama.engine.data.sources import SourceError, list_chunks
from raytune_llama.engine.data.store import (
    STORE_VERSION,
    StoreBuildError,
    TokenStore,
    build_chunk,
    chunk_dir,
    create_store,
    record_build_error,
    tokenizer_digest,
    write_counts,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    """What the store holds (so far: the build may still be running)."""

    store_path: str
    seq_len: int
    chunks: int
    chunks_built: int
    num_samples: Optional[int]
    """Packed sequences in the whole store; None until every chunk is built."""
    docs_skipped: int = 0
    """Source rows that were not usable text (empty, missing, not a string, not JSON), in the built chunks."""
    has_doc_ids: bool = False


def store_root(data: DataConfig, storage_path: str) -> Path:
    return Path(data.store_dir) if data.store_dir else Path(storage_path) / "token_store"


def open_token_store(cfg: DataConfig, tokenizer_path: str, root: str | Path,
                     path: Optional[str] = None) -> TokenStore:
    """List the corpus's chunks and open (or create) the store for this content, tokenizer,
    seq_len, row format and packing. Errors (a missing column, an unreadable Parquet footer, no
    data, a chat format without a chat template) name the field. `path` (data.eval_path) opens
    the store of another corpus read the same way, with nothing held out of it."""
    from raytune_llama.engine.data.sft import has_chat_template
    from raytune_llama.engine.tokenizer_build import load_tokenizer

    tok = load_tokenizer(tokenizer_path)  # once, on the driver: the special-token ids
    if cfg.row_format == "chat" and not has_chat_template(tok, cfg.chat_template):
        raise ValueError(f"data.chat_template: the tokenizer at {tokenizer_path} has no chat template, which "
                         f"data.format: chat needs; set data.chat_template to a Jinja chat template, or use a "
                         f"tokenizer that has one (e.g. an -Instruct model's)")
    source = path or cfg.path
    fmt = resolve_reader(source, cfg.file_reader)
    chunks, content = list_chunks(source, fmt, max(1, int(cfg.chunk_mb * 2**20)), split=cfg.hf_split,
                                  streaming=cfg.hf_streaming, columns=tuple(needed_columns(cfg) + [("id_column", cfg.id_column)]))
    if not chunks:
        raise ValueError(f"data.{'eval_path' if path else 'path'}: {source!r} produced no training sequences "
                         f"(empty dataset)")
    spec = {"version": STORE_VERSION, "format": fmt, "content": content, "tokenizer": tokenizer_digest(tokenizer_path),
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "seq_len": cfg.seq_len,
            "text_column": cfg.text_column, "id_column": cfg.id_column, "chunk_mb": cfg.chunk_mb,
            "tokenize_batch_size": cfg.tokenize_batch_size, "packing": cfg.packing, "row_format": cfg.row_format,
            "eval_fraction": 0.0 if path else float(cfg.eval_fraction)}
    if cfg.row_format != "text":
        spec["train_on_prompt"] = bool(cfg.train_on_prompt)
    if cfg.row_format == "chat":
        spec.update(messages_column=cfg.messages_column, chat_template=cfg.chat_template)
    if cfg.row_format == "instruction":
        spec.update(prompt_template=cfg.prompt_template, response_column=cfg.response_column)
    return TokenStore(create_store(root, spec, chunks))


def open_eval_data(cfg: DataConfig, tokenizer_path: str, train: TokenStore, storage_path: str,
                   cpus_free: float) -> tuple[Optional[dict], Optional["StoreBuilder"]]:
    """The validation data of a run, as the workers open it ({"path", "part"}: evaluation.py),
    and the builder of its own store for data.eval_path (started; None otherwise).
    data.eval_fraction: the held-out part of the training store itself."""
    if cfg.eval_path is not None:
        store = open_token_store(cfg, tokenizer_path, store_root(cfg, storage_path), path=cfg.eval_path)
        builder = StoreBuilder(store, tokenizer_path, cfg.shuffle_seed, cfg.shuffle, cpus_free).start()
        return {"path": str(store.path), "part": "train"}, builder
    if cfg.eval_fraction:
        return {"path": str(train.path), "part": "eval"}, None
    return None, None


def _build_task(row: dict, *, store: str, tokenizer_path: str) -> dict:
    """Ray Data map function: build one chunk, return its meta (a few numbers). A source that
    cannot be read is recorded in the store here, in its own words (Ray wraps the exception)."""
    try:
        return build_chunk(store, row["index"], tokenizer_path)
    except SourceError as exc:
        record_build_error(store, str(exc))
        raise


class StoreBuilder:
    """Tokenizes the store's missing chunks with Ray Data on a background thread of the driver,
    in epoch 0's order; writes counts.json when the last one is done, build_error.json (which
    the waiting workers raise) if a chunk cannot be read."""

    def __init__(self, store: TokenStore, tokenizer_path: str, seed: int, shuffle: bool, cpus_free: float):
        """cpus_free: the cluster's CPUs beyond what the training workers reserve. Build tasks
        take one CPU each, at most that many at a time, so the workers always fit; with none
        free, one task at a time reserves no CPU (sharing the workers' cores) instead of
        waiting forever for a CPU the workers hold."""
        self.store, self.tokenizer_path = store, tokenizer_path
        self.task_cpus, self.concurrency = (1, int(cpus_free)) if cpus_free >= 1 else (0, 1)
        order = chunk_order(store.num_chunks, seed, 0, shuffle)
        self.pending = [int(i) for i in order if not (chunk_dir(store.path, int(i)) / "meta.json").is_file()]
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="token-store-build", daemon=True)

    def start(self) -> "StoreBuilder":
        if self.store.counts() is None:
            self._thread.start()
        return self

    def _run(self) -> None:
        import ray.data

        # Ray Data's usage collector queries a Prometheus server at localhost:9090 after each
        # execution and logs a traceback per metric when there is none (the usual case).
        os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
        # The driver prints its own data line; Ray Data's per-execution INFO lines and operator
        # statistics would interleave with the progress line.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        console.quiet_ray_data()  # known-harmless warnings off the console; ray-data.log keeps them
        try:
            if self.pending:
                ctx = ray.data.DataContext.get_current()
                ctx.enable_progress_bars = False  # the driver prints its own progress line
                ds = ray.data.from_items([{"index": i} for i in self.pending], override_num_blocks=len(self.pending))
                # No more concurrent tasks than chunks to build: Ray Data warns (UserWarning,
                # "The maximum number of concurrent tasks ... is set to 2, but the operator only
                # received 1 input(s)") about a pool larger than its input.
                size = min(self.concurrency, len(self.pending))
                ds = ds.map(_build_task, fn_kwargs={"store": str(self.store.path),
                                                    "tokenizer_path": self.tokenizer_path},
                            num_cpus=self.task_cpus, compute=ray.data.TaskPoolStrategy(size=size))
                for _ in ds.iter_rows():
                    if self._stop.is_set():
                        return
            write_counts(self.store.path, [self.store.meta(i) for i in range(self.store.num_chunks)])
        except Exception as exc:  # a bad file fails inside a Ray Data task: name it for everyone
            if self._stop.is_set():
                return
            recorded = self.store.path / "build_error.json"
            self.error = json.loads(recorded.read_text())["error"] if recorded.is_file() else _root_message(exc)
            if not recorded.is_file():
                record_build_error(self.store.path, self.error)
            log.error("token store build failed: %s", self.error)

    def stop(self) -> None:
        """Stop launching chunks (those written stay for the next run)."""
        self._stop.set()

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)


def _root_message(exc: BaseException) -> str:
    """The message of the source error behind a failed build (Ray wraps a task's exception in
    several layers and appends retry hints): the first line naming a data.* field, else the
    innermost error's first line."""
    chain, seen = [], exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = getattr(seen, "cause", None) or seen.__cause__
    for e in chain:  # the message itself is args[0]; str() of a task error adds the traceback
        message = e.args[0] if e.args and isinstance(e.args[0], str) else ""
        if message.startswith("data."):
            return message[:600]
    text = str(chain[-1]).strip().splitlines()
    return (text[0] if text else type(chain[-1]).__name__)[:600]


def wait_for_first_batch(store: TokenStore, data: DataConfig, global_batch: int) -> None:
    """Block until the first global batch's chunks are built (raises the build's error, or
    ValueError when the whole corpus is smaller than one global batch)."""
    try:
        SampleOrder.for_data(store, data, global_batch).epoch_and_offset(0)
    except StoreBuildError as exc:
        raise ValueError(str(exc)) from exc


def dataset_info(store: TokenStore, cfg: DataConfig) -> DatasetInfo:
    """Totals over the chunks built so far (all of them once counts.json exists)."""
    counts = store.counts()
    if counts is not None:
        built, rows, skipped = store.num_chunks, counts["total_rows"], counts["docs_skipped"]
    else:
        metas = [chunk_dir(store.path, i) / "meta.json" for i in range(store.num_chunks)]
        done = [store.meta(i) for i, m in enumerate(metas) if m.is_file()]
        built, rows, skipped = len(done), None, sum(m["docs_skipped"] for m in done)
    return DatasetInfo(str(store.path), store.seq_len, store.num_chunks, built, rows, skipped,
                       cfg.id_column is not None)
