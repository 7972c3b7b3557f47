"""The packed token store: a corpus tokenized once per (content, tokenizer, seq_len), on disk.

Layout of one store (docs/data.md "Token store"):

    {store_root}/{key}/store.json                what was tokenized: chunks, seq_len, tokenizer
    {store_root}/{key}/chunks/{i:06d}/tokens.bin uint32 [rows, seq_len], rows as data.packing packs them
    {store_root}/{key}/chunks/{i:06d}/positions.bin  position ids (uint16; packing documents)
    {store_root}/{key}/chunks/{i:06d}/targets.bin  1 per loss target, 0 per prompt token (uint8; chat, instruction)
    {store_root}/{key}/chunks/{i:06d}/row_tokens.bin  real tokens per row (int32; packing documents, none)
    {store_root}/{key}/chunks/{i:06d}/doc_ids.json  ids of the documents starting in each row (data.id_column)
    {store_root}/{key}/chunks/{i:06d}/eval/...   the same files for the held-out documents (data.eval_fraction)
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
from raytune_llama.engine.packing import clean_texts_indexed, labels_for, make_packer, tokenize_texts
from raytune_llama.engine.data.sft import example_pieces, source_columns, tokenize_examples
from raytune_llama.engine.data.sources import iter_chunk_documents

STORE_VERSION = 2
TOKEN_DTYPE = np.uint32
POLL_S = 0.2


class StoreBuildError(RuntimeError):
    """The build of the token store failed; the message says which file and why."""


def tokenizer_digest(tokenizer_path: str) -> str:
    """SHA-256 over the tokenizer's files (tokenizer.json, sentencepiece models, vocab, config)."""
    h = hashlib.sha256()
    root = Path(tokenizer_path)
    names = sorted(f.name for f in root.iterdir() if f.is_file() and (
        f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template"))
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
def chunk_tokenizer(path: str, eos_token_id: int, pad_token_id: int, chat: bool = False):
    """The tokenizer in a build task: the `tokenizers` library straight from tokenizer.json
    when there is one (no transformers import, seconds per task process), else, and for chat
    templates (transformers renders them), transformers."""
    from raytune_llama.engine.tokenizer_build import BackendTokenizer, load_tokenizer

    if not chat and (Path(path) / "tokenizer.json").is_file():
        return BackendTokenizer(Path(path) / "tokenizer.json", eos_token_id, pad_token_id)
    return load_tokenizer(path)


def chunk_dir(store: str | os.PathLike, index: int) -> Path:
    return Path(store) / "chunks" / f"{index:06d}"


PARTS = {"train": "", "eval": "eval"}  # sub-folder of a chunk holding each part's rows


def positions_dtype(seq_len: int):
    return np.uint16 if seq_len <= 2**16 else np.uint32


class _PartWriter:
    """The files of one part (train or held-out eval rows) of a chunk being built."""

    def __init__(self, folder: Path, spec: dict):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.files = folder, {}
        self.dtypes = {"tokens": TOKEN_DTYPE, "positions": positions_dtype(spec["seq_len"]),
                       "targets": np.uint8, "row_tokens": np.int32}
        with_targets = spec.get("row_format", "text") != "text"
        self.packer = make_packer(spec.get("packing", "naive"), spec["seq_len"], spec["eos_token_id"],
                                  spec["pad_token_id"], self.write, with_ids=spec["id_column"] is not None,
                                  with_targets=with_targets)
        self.keep_positions = spec.get("packing", "naive") == "documents"

    def write(self, rows: dict) -> None:
        for key, array in rows.items():
            if key == "positions" and not self.keep_positions:
                continue  # packing none: positions are 0..seq_len-1 in every row
            if key not in self.files:
                self.files[key] = open(self.folder / f"{key}.bin", "wb")
            self.files[key].write(np.ascontiguousarray(array, dtype=self.dtypes[key]).tobytes())

    def finish(self) -> dict:
        done = self.packer.finish()
        if "tokens" not in self.files:
            (self.folder / "tokens.bin").write_bytes(b"")
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        if done["doc_ids"] is not None:
            (self.folder / "doc_ids.json").write_text(json.dumps(done["doc_ids"]))
        return {"rows": done["rows"], "tokens": done["tokens"], "documents": done["docs"],
                "split_docs": done["split_docs"], "last_row_tokens": done["last_row_tokens"]}


def _documents(spec: dict, chunk: dict, tokenizer):
    """(token lists, target masks or None, EOS-is-target flags or None, ids or None, skipped)
    per batch of one chunk's usable documents, in source order."""
    row_format = spec.get("row_format", "text")
    for docs, ids in iter_chunk_documents(chunk, source_columns(spec), spec["id_column"],
                                          spec["tokenize_batch_size"]):
        if row_format == "text":
            kept, where, bad = clean_texts_indexed(docs)
            yield tokenize_texts(tokenizer, kept), None, None, where, ids, bad
            continue
        pieces = [example_pieces(spec, tokenizer, row) for row in docs]
        where = [i for i, p in enumerate(pieces) if p]
        tokens, masks, eos = tokenize_examples(tokenizer, [pieces[i] for i in where], spec.get("train_on_prompt", False))
        yield tokens, masks, eos, where, ids, len(docs) - len(where)


def _held_out(chunk_index: int, count: int, fraction: float, drawn: int) -> np.ndarray:
    """Which of the next `count` documents of a chunk are held out for evaluation: a seeded
    draw per document in source order, the same on every build of this chunk."""
    if fraction <= 0:
        return np.zeros(count, dtype=bool)
    rng = np.random.default_rng([chunk_index, drawn])
    return rng.random(count) < fraction


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
    tokenizer = chunk_tokenizer(tokenizer_path, spec["eos_token_id"], spec["pad_token_id"],
                                chat=spec.get("row_format") == "chat")
    fraction = float(spec.get("eval_fraction") or 0.0)
    tmp = store / "chunks" / f".{index:06d}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        writers = {"train": _PartWriter(tmp, spec)}
        if fraction > 0:
            writers["eval"] = _PartWriter(tmp / PARTS["eval"], spec)
        skipped = drawn = 0
        for tokens, masks, eos, where, ids, bad in _documents(spec, chunk, tokenizer):
            skipped += bad
            held = _held_out(index, len(tokens), fraction, drawn)
            drawn += 1
            for part, take in (("train", ~held), ("eval", held)):
                sel = np.nonzero(take)[0]
                if not len(sel):
                    continue
                writers[part].packer.add([tokens[i] for i in sel],
                                         None if ids is None else [ids[where[i]] for i in sel],
                                         None if masks is None else [masks[i] for i in sel],
                                         None if eos is None else [eos[i] for i in sel])
        metas = {part: w.finish() for part, w in writers.items()}
        meta = {"index": index, **metas["train"], "docs_skipped": skipped}
        if "eval" in metas:
            meta["eval"] = metas["eval"]
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
              "docs_skipped": sum(m["docs_skipped"] for m in metas),
              "split_docs": sum(m.get("split_docs", 0) for m in metas)}
    if any("eval" in m for m in metas):
        counts["eval"] = {"rows": [m.get("eval", {}).get("rows", 0) for m in metas],
                          "tokens": sum(m.get("eval", {}).get("tokens", 0) for m in metas),
                          "documents": sum(m.get("eval", {}).get("documents", 0) for m in metas)}
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
    """Read side of a store: chunk metas (waiting for chunks still being built) and rows, of its
    training part or (part="eval") of the documents held out by data.eval_fraction."""

    def __init__(self, path: str | os.PathLike, part: str = "train"):
        self.path = Path(path)
        info = json.loads((self.path / "store.json").read_text())
        self.spec, self.chunks = info["spec"], info["chunks"]
        if part not in PARTS:
            raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
        if part == "eval" and not float(self.spec.get("eval_fraction") or 0):
            raise ValueError(f"{self.path}: this store holds no evaluation part (data.eval_fraction was 0)")
        self.part = part
        self.seq_len: int = self.spec["seq_len"]
        self.packing: str = self.spec.get("packing", "naive")
        self._metas: dict[int, dict] = {}
        self._counts: Optional[dict] = None
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def has_positions(self) -> bool:
        """Rows carry per-document position ids (packing documents)."""
        return self.packing == "documents"

    def counts(self) -> Optional[dict]:
        """counts.json once every chunk is built (the eval part's counts for part eval), else None."""
        if self._counts is None and (self.path / "counts.json").is_file():
            counts = json.loads((self.path / "counts.json").read_text())
            if self.part == "eval":
                ev = counts["eval"]
                counts = {**counts, "rows": ev["rows"], "total_rows": sum(ev["rows"]), "tokens": ev["tokens"],
                          "documents": ev["documents"]}
            self._counts = counts
        return self._counts

    def chunk_rows(self, index: int, timeout_s: Optional[float] = None) -> int:
        return self.meta(index, timeout_s)["rows"]

    def chunk_meta(self, index: int, timeout_s: Optional[float] = None) -> dict:
        """Chunk index's whole meta.json (both parts), waiting while it is being built
        (StoreBuildError if the build failed, TimeoutError after timeout_s)."""
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

    def meta(self, index: int, timeout_s: Optional[float] = None) -> dict:
        """This part's meta of chunk index (rows, tokens, documents, last_row_tokens)."""
        meta = self.chunk_meta(index, timeout_s)
        return meta["eval"] if self.part == "eval" else meta

    def _file(self, index: int, name: str) -> Path:
        return chunk_dir(self.path, index) / PARTS[self.part] / name

    def _array(self, index: int, name: str) -> np.ndarray:
        """A memory map of one of chunk index's files ([rows, seq_len]; row_tokens: [rows])."""
        key = (index, name)
        if key not in self._maps:
            if len(self._maps) >= 16:  # a few chunks open at a time
                self._maps.pop(next(iter(self._maps)))
            rows = self.chunk_rows(index)
            dtype = {"tokens": TOKEN_DTYPE, "positions": positions_dtype(self.seq_len), "targets": np.uint8,
                     "row_tokens": np.int32}[name]
            shape = (rows,) if name == "row_tokens" else (rows, self.seq_len)
            self._maps[key] = np.zeros(shape, dtype=dtype) if rows == 0 else \
                np.memmap(self._file(index, f"{name}.bin"), dtype=dtype, mode="r", shape=shape)
        return self._maps[key]

    def num_tokens(self, index: int, rows: np.ndarray) -> np.ndarray:
        """Real tokens of the given rows of a chunk: from its meta under naive packing (only the
        last row is short), else from row_tokens.bin."""
        rows = np.asarray(rows)
        if self.packing != "naive":
            return self._array(index, "row_tokens")[rows].astype(np.int64)
        meta = self.meta(index)
        return np.where(rows == meta["rows"] - 1, meta["last_row_tokens"], self.seq_len)

    def tokens_of(self, chunk_rows: list[tuple[int, int]]) -> int:
        """Real tokens of the given rows (naive packing: from the chunks' metas alone)."""
        pairs = np.asarray(chunk_rows, dtype=np.int64).reshape(len(chunk_rows), 2)
        return int(sum(self.num_tokens(int(c), pairs[pairs[:, 0] == c, 1]).sum() for c in np.unique(pairs[:, 0])))

    def read(self, chunk_rows: list[tuple[int, int]], with_ids: bool = False) -> dict[str, np.ndarray]:
        """The rows (chunk, row) in the order given: input_ids, labels (int64), num_tokens,
        position_ids (packing documents) and, with ids, doc_ids. Reads only those rows' bytes."""
        n = len(chunk_rows)
        input_ids = np.empty((n, self.seq_len), dtype=np.int64)
        num_tokens = np.empty(n, dtype=np.int64)
        positions = np.empty((n, self.seq_len), dtype=np.int64) if self.has_positions else None
        with_targets = self.spec.get("row_format", "text") != "text"
        targets = np.empty((n, self.seq_len), dtype=np.uint8) if with_targets else None
        doc_ids = np.empty(n, dtype=object) if with_ids else None
        pairs = np.asarray(chunk_rows, dtype=np.int64).reshape(n, 2)
        for chunk in np.unique(pairs[:, 0]):
            at = np.nonzero(pairs[:, 0] == chunk)[0]
            rows = pairs[at, 1]
            input_ids[at] = self._array(int(chunk), "tokens")[rows]
            num_tokens[at] = self.num_tokens(int(chunk), rows)
            if positions is not None:
                positions[at] = self._array(int(chunk), "positions")[rows]
            if targets is not None:
                targets[at] = self._array(int(chunk), "targets")[rows]
            if with_ids:
                ids = self._doc_ids(int(chunk))
                doc_ids[at] = [ids[r] for r in rows]
        out = {"input_ids": input_ids, "labels": labels_for(input_ids, num_tokens, positions, targets),
               "num_tokens": num_tokens}
        if positions is not None:
            out["position_ids"] = positions
        if with_ids:
            out["doc_ids"] = doc_ids
        return out

    @lru_cache(maxsize=4)
    def _doc_ids(self, index: int) -> list[str]:
        return json.loads(self._file(index, "doc_ids.json").read_text())
