"""The packed token store: a corpus tokenized once per (content, tokenizer, seq_len), on disk.

Layout of one store (docs/data.md "Token store"):

    {store_root}/{key}/store.json                what was tokenized: chunks, seq_len, tokenizer
    {store_root}/{key}/chunks/{i:06d}/tokens.bin uint32 [rows, seq_len], rows packed as RowPacker does
    {store_root}/{key}/chunks/{i:06d}/doc_ids.json  ids of the documents starting in each row (data.id_column)
    {store_root}/{key}/chunks/{i:06d}/meta.json  rows, tokens, documents, skipped rows (the chunk is done)
    {store_root}/{key}/counts.json               every chunk's row count, once all are done
    {store_root}/{key}/build_error.json          why the build stopped (read by waiting workers)

`key` hashes everything that decides the tokens, so a resubmitted job, a resumed run or
another run on the same corpus finds the chunks already written and never tokenizes them
again, while a changed file, tokenizer or seq_len gets a new store. A chunk becomes visible by
one atomic rename of its folder, meta.json inside, so a reader never sees half a chunk and two
builders racing on one chunk waste work but never corrupt it. 4 bytes per token on disk; a
reader memory-maps the tokens and touches only the rows it trains on.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from raytune_llama.engine.atomic_files import write_json_atomic
from raytune_llama.engine.packing import RowPacker, clean_texts_indexed, labels_for, tokenize_texts
from raytune_llama.engine.data.sources import iter_chunk_documents

STORE_VERSION = 1
TOKEN_DTYPE = np.uint32
POLL_S = 0.2


class StoreBuildError(RuntimeError):
    """The build of the token store failed; the message says which file and why."""


def tokenizer_digest(tokenizer_path: str) -> str:
    """SHA-256 over the tokenizer's files (tokenizer.json, sentencepiece models, vocab, config)."""
    h = hashlib.sha256()
    root = Path(tokenizer_path)
    names = sorted(f.name for f in root.iterdir() if f.is_file() and (
        f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens"))
        or f.suffix == ".model"))
    for name in names:
        h.update(name.encode())
        h.update((root / name).read_bytes())
    return h.hexdigest()


def store_key(spec: dict) -> str:
    """The store folder's name: a hash of everything that decides its tokens."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def create_store(store_root: str | os.PathLike, spec: dict, chunks: list[dict]) -> Path:
    """The store folder for spec (created with its store.json if new); returns its path."""
    path = Path(store_root) / store_key(spec)
    (path / "chunks").mkdir(parents=True, exist_ok=True)
    if not (path / "store.json").is_file():
        write_json_atomic(path / "store.json", {"version": STORE_VERSION, "spec": spec, "chunks": chunks})
    (path / "build_error.json").unlink(missing_ok=True)  # a new build gets a new chance
    return path


@lru_cache(maxsize=4)
def chunk_tokenizer(path: str, eos_token_id: int, pad_token_id: int):
    """The tokenizer in a build task: the `tokenizers` library straight from tokenizer.json
    when there is one (no transformers import, seconds per task process), else transformers."""
    from raytune_llama.engine.tokenizer_build import BackendTokenizer, load_tokenizer

    if (Path(path) / "tokenizer.json").is_file():
        return BackendTokenizer(Path(path) / "tokenizer.json", eos_token_id, pad_token_id)
    return load_tokenizer(path)


def chunk_dir(store: str | os.PathLike, index: int) -> Path:
    return Path(store) / "chunks" / f"{index:06d}"


def build_chunk(store: str | os.PathLike, index: int, tokenizer_path: str) -> dict:
    """Tokenize and pack chunk `index` of the store (if no builder has yet) with the tokenizer
    at tokenizer_path (the one store.json's digest names); returns the chunk's meta.
    Memory: one tokenize batch of documents plus one row, whatever the chunk's size."""
    store = Path(store)
    final = chunk_dir(store, index)
    if (final / "meta.json").is_file():
        return json.loads((final / "meta.json").read_text())
    info = json.loads((store / "store.json").read_text())
    spec, chunk = info["spec"], info["chunks"][index]
    tokenizer = chunk_tokenizer(tokenizer_path, spec["eos_token_id"], spec["pad_token_id"])
    tmp = store / "chunks" / f".{index:06d}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        with open(tmp / "tokens.bin", "wb") as out:
            packer = RowPacker(spec["seq_len"], spec["eos_token_id"], spec["pad_token_id"],
                               lambda rows: out.write(rows.astype(TOKEN_DTYPE, copy=False).tobytes()),
                               with_ids=spec["id_column"] is not None)
            skipped = 0
            for texts, ids in iter_chunk_documents(chunk, spec["text_column"], spec["id_column"],
                                                   spec["tokenize_batch_size"]):
                kept, where, bad = clean_texts_indexed(texts)
                skipped += bad
                packer.add(tokenize_texts(tokenizer, kept), None if ids is None else [ids[i] for i in where])
            done = packer.finish()
            out.flush()
            os.fsync(out.fileno())
        if done["doc_ids"] is not None:
            (tmp / "doc_ids.json").write_text(json.dumps(done["doc_ids"]))
        meta = {"index": index, "rows": done["rows"], "tokens": done["tokens"],
                "documents": done["docs"], "docs_skipped": skipped, "last_row_tokens": done["last_row_tokens"]}
        write_json_atomic(tmp / "meta.json", meta)
        try:
            os.rename(tmp, final)
        except OSError:  # another builder finished this chunk first: theirs stands
            if not (final / "meta.json").is_file():
                raise
        return json.loads((final / "meta.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_counts(store: str | os.PathLike, metas: list[dict]) -> dict:
    """counts.json: every chunk's rows and the totals, written once all chunks are done."""
    counts = {"rows": [m["rows"] for m in metas], "total_rows": sum(m["rows"] for m in metas),
              "tokens": sum(m["tokens"] for m in metas), "documents": sum(m["documents"] for m in metas),
              "docs_skipped": sum(m["docs_skipped"] for m in metas)}
    write_json_atomic(Path(store) / "counts.json", counts)
    return counts


def build_all(store: str | os.PathLike, tokenizer_path: str) -> "TokenStore":
    """Build every missing chunk in this process, one after another (tests, benchmarks, and
    tools without a Ray cluster; runs build with Ray Data: trainer/data_pipeline.py)."""
    info = json.loads((Path(store) / "store.json").read_text())
    write_counts(store, [build_chunk(store, i, tokenizer_path) for i in range(len(info["chunks"]))])
    return TokenStore(store)


def record_build_error(store: str | os.PathLike, message: str) -> None:
    write_json_atomic(Path(store) / "build_error.json", {"error": message, "time": time.time()})


class TokenStore:
    """Read side of a store: chunk metas (waiting for chunks still being built) and rows."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        info = json.loads((self.path / "store.json").read_text())
        self.spec, self.chunks = info["spec"], info["chunks"]
        self.seq_len: int = self.spec["seq_len"]
        self._metas: dict[int, dict] = {}
        self._counts: Optional[dict] = None
        self._maps: dict[int, np.memmap] = {}

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def counts(self) -> Optional[dict]:
        """counts.json once every chunk is built, else None."""
        if self._counts is None and (self.path / "counts.json").is_file():
            self._counts = json.loads((self.path / "counts.json").read_text())
        return self._counts

    def chunk_rows(self, index: int, timeout_s: Optional[float] = None) -> int:
        return self.meta(index, timeout_s)["rows"]

    def meta(self, index: int, timeout_s: Optional[float] = None) -> dict:
        """Chunk index's meta, waiting while it is being built (StoreBuildError if the build
        failed, TimeoutError after timeout_s)."""
        if index in self._metas:
            return self._metas[index]
        counts = self.counts()
        path = chunk_dir(self.path, index) / "meta.json"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not path.is_file():
            if counts is not None:
                raise StoreBuildError(f"{self.path}: chunk {index} is missing although counts.json lists it")
            error = self.path / "build_error.json"
            if error.is_file():
                raise StoreBuildError(json.loads(error.read_text())["error"])
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.path}: chunk {index} not built after {timeout_s:.0f} s")
            time.sleep(POLL_S)
        self._metas[index] = json.loads(path.read_text())
        return self._metas[index]

    def _tokens(self, index: int) -> np.memmap:
        if index not in self._maps:
            if len(self._maps) >= 8:  # a few chunks open at a time
                self._maps.pop(next(iter(self._maps)))
            rows = self.chunk_rows(index)
            self._maps[index] = np.memmap(chunk_dir(self.path, index) / "tokens.bin", dtype=TOKEN_DTYPE,
                                          mode="r", shape=(rows, self.seq_len))
        return self._maps[index]

    def num_tokens(self, index: int, rows: np.ndarray) -> np.ndarray:
        """Real tokens of the given rows of a chunk (from its meta: only the last row is short)."""
        meta = self.meta(index)
        return np.where(np.asarray(rows) == meta["rows"] - 1, meta["last_row_tokens"], self.seq_len)

    def tokens_of(self, chunk_rows: list[tuple[int, int]]) -> int:
        """Real tokens of the given rows, from the chunks' metas alone (no row is read)."""
        meta = [self.meta(c) for c, _ in chunk_rows]
        return sum(m["last_row_tokens"] if r == m["rows"] - 1 else self.seq_len for m, (_, r) in zip(meta, chunk_rows))

    def read(self, chunk_rows: list[tuple[int, int]], with_ids: bool = False) -> dict[str, np.ndarray]:
        """The rows (chunk, row) in the order given: input_ids, labels (int64), num_tokens and,
        with ids, doc_ids. Reads only those rows' bytes."""
        n = len(chunk_rows)
        input_ids = np.empty((n, self.seq_len), dtype=np.int64)
        num_tokens = np.empty(n, dtype=np.int64)
        doc_ids = np.empty(n, dtype=object) if with_ids else None
        pairs = np.asarray(chunk_rows, dtype=np.int64).reshape(n, 2)
        for chunk in np.unique(pairs[:, 0]):
            at = np.nonzero(pairs[:, 0] == chunk)[0]
            rows = pairs[at, 1]
            input_ids[at] = self._tokens(int(chunk))[rows]
            num_tokens[at] = self.num_tokens(int(chunk), rows)
            if with_ids:
                ids = self._doc_ids(int(chunk))
                doc_ids[at] = [ids[r] for r in rows]
        out = {"input_ids": input_ids, "labels": labels_for(input_ids, num_tokens), "num_tokens": num_tokens}
        if with_ids:
            out["doc_ids"] = doc_ids
        return out

    @lru_cache(maxsize=4)
    def _doc_ids(self, index: int) -> list[str]:
        return json.loads((chunk_dir(self.path, index) / "doc_ids.json").read_text())
