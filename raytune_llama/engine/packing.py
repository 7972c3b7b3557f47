"""Tokenize documents and pack them into fixed-length training sequences.

Documents are joined with EOS and cut into `seq_len` rows, so no token is lost at a row
boundary (a document longer than seq_len simply continues in the next row); only the last
row of a packed stream is padded, and padding gets label -100 (the same semantics as masking
pad tokens in a plain HF loop). Pure numpy: the token store (engine/data/store.py) streams a
whole chunk of the corpus through one packer; tests call these directly.

`data.packing` chooses how documents share rows: `naive` (RowPacker) cuts the joined stream
every seq_len tokens; `documents` (DocumentPacker, the default) keeps each document whole in
one row where it fits and gives it position ids from 0, so attention and the loss stay inside
it; `none` gives every document a row of its own (docs/data.md "Packing").

When documents have ids, each row records the comma-joined ids of the documents that START
in it: every document is listed in exactly one row, which lets a run prove that no document
was trained on twice or skipped (README, "Exactly-once data"; docs/data.md "Order, shuffling and resume")."""
from __future__ import annotations

from itertools import chain
from typing import Iterable, Sequence

import numpy as np

IGNORE_INDEX = -100  # label of tokens that do not count in the loss (HF convention)


def clean_texts(texts: Iterable) -> tuple[list[str], int]:
    """Keep non-empty string texts; return them and how many were skipped."""
    kept, _, skipped = clean_texts_indexed(texts)
    return kept, skipped


def clean_texts_indexed(texts: Iterable) -> tuple[list[str], list[int], int]:
    """Non-empty string texts (bytes decoded as UTF-8, invalid bytes replaced), their
    positions in the input, and how many rows were skipped."""
    kept, index, skipped = [], [], 0
    for i, text in enumerate(texts):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if isinstance(text, str) and text.strip():
            kept.append(text)
            index.append(i)
        else:
            skipped += 1
    return kept, index, skipped


def tokenize_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (EOS is added when packing)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


PACKING_MODES = ("documents", "naive", "none")
SINK_ROWS = 256  # rows handed to the sink at a time by the document packer


class RowPacker:
    """`data.packing: naive`. Documents in, rows of exactly seq_len tokens out: each document
    is followed by EOS and the stream is cut every seq_len tokens, the tail of one batch
    carried into the next, so only the last row of everything packed is padded. `sink(rows)`
    receives each batch's full rows: {"tokens": uint32 [n, seq_len]} plus, with_targets,
    {"targets": uint8 [n, seq_len]} (1 where the token is a loss target). With ids,
    remembers which row each document starts in."""

    mode = "naive"

    def __init__(self, seq_len: int, eos_id: int, pad_id: int, sink, with_ids: bool = False,
                 with_targets: bool = False):
        self.seq_len, self.eos_id, self.pad_id, self.sink = seq_len, eos_id, pad_id, sink
        self.with_targets = with_targets
        self.carry = np.zeros(0, dtype=np.uint32)
        self.carry_targets = np.zeros(0, dtype=np.uint8)
        self.rows = 0
        self.tokens = 0  # stream length so far: real tokens + one EOS per document
        self.docs = 0
        self.split_docs = 0  # documents longer than a row
        self.starts: list[list[str]] | None = [] if with_ids else None

    def add(self, docs: Sequence[Sequence[int]], doc_ids: Sequence | None = None,
            targets: Sequence[np.ndarray] | None = None, eos_targets: Sequence[bool] | None = None) -> None:
        """Append documents (token ids without EOS); with_targets, `targets` holds each
        document's uint8 target mask and `eos_targets` whether its EOS is a target."""
        if not docs:
            return
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        eos_at = np.cumsum(lengths + 1) - 1  # each document is followed by one EOS
        stream = np.empty(int(eos_at[-1]) + 1, dtype=np.uint32)
        is_token = np.ones(len(stream), dtype=bool)
        is_token[eos_at] = False
        stream[is_token] = np.fromiter(chain.from_iterable(docs), dtype=np.uint32, count=int(lengths.sum()))
        stream[eos_at] = self.eos_id
        if self.with_targets:
            stream_targets = np.empty(len(stream), dtype=np.uint8)
            stream_targets[is_token] = np.concatenate(targets) if len(targets) else np.zeros(0, np.uint8)
            stream_targets[eos_at] = np.asarray(eos_targets, dtype=np.uint8)
        if self.starts is not None:
            first_row = (self.tokens + eos_at - lengths) // self.seq_len  # the row of each first token
            for doc_id, row in zip(doc_ids if doc_ids is not None else [None] * len(docs), first_row):
                while len(self.starts) <= row:
                    self.starts.append([])
                self.starts[int(row)].append(str(doc_id))
        self.tokens += len(stream)
        self.docs += len(docs)
        self.split_docs += int((lengths + 1 > self.seq_len).sum())
        buf = np.concatenate([self.carry, stream])
        full = len(buf) // self.seq_len
        out = {}
        if full:
            out["tokens"] = buf[: full * self.seq_len].reshape(full, self.seq_len)
        if self.with_targets:
            tbuf = np.concatenate([self.carry_targets, stream_targets])
            if full:
                out["targets"] = tbuf[: full * self.seq_len].reshape(full, self.seq_len)
            self.carry_targets = tbuf[full * self.seq_len:]
        if full:
            self.sink(out)
            self.rows += full
        self.carry = buf[full * self.seq_len:]

    def finish(self) -> dict:
        """Pad and emit the last partial row; returns {rows, tokens, docs, split_docs,
        last_row_tokens, doc_ids (comma-joined ids starting in each row, or None)}."""
        last = self.seq_len
        if len(self.carry):
            last = len(self.carry)
            row = np.full(self.seq_len, self.pad_id, dtype=np.uint32)
            row[:last] = self.carry
            out = {"tokens": row.reshape(1, self.seq_len)}
            if self.with_targets:
                t = np.zeros(self.seq_len, dtype=np.uint8)
                t[:last] = self.carry_targets
                out["targets"] = t.reshape(1, self.seq_len)
            self.sink(out)
            self.rows += 1
            self.carry = self.carry[:0]
        return {"rows": self.rows, "tokens": self.tokens, "docs": self.docs, "split_docs": self.split_docs,
                "last_row_tokens": last, "doc_ids": _ids_per_row(self.starts, self.rows)}


def _ids_per_row(starts: list[list[str]] | None, rows: int) -> list[str] | None:
    if starts is None:
        return None
    return [",".join(cell) for cell in starts] + [""] * (rows - len(starts))


class _OpenRow:
    """A row being filled by the document packer."""

    def __init__(self, seq_len: int, pad_id: int):
        self.tokens = np.full(seq_len, pad_id, dtype=np.uint32)
        self.positions = np.zeros(seq_len, dtype=np.uint32)
        self.targets = np.zeros(seq_len, dtype=np.uint8)
        self.fill = 0
        self.ids: list[str] = []

    def place(self, tokens: np.ndarray, targets: np.ndarray) -> None:
        n = len(tokens)
        self.tokens[self.fill:self.fill + n] = tokens
        self.positions[self.fill:self.fill + n] = np.arange(n, dtype=np.uint32)
        self.targets[self.fill:self.fill + n] = targets
        self.fill += n

    def close(self) -> None:
        """Padding continues the last document's positions (it never opens a document)."""
        seq_len = len(self.tokens)
        if self.fill < seq_len:
            last = int(self.positions[self.fill - 1]) + 1 if self.fill else 0
            self.positions[self.fill:] = np.arange(last, last + seq_len - self.fill, dtype=np.uint32)


class DocumentPacker:
    """`data.packing: documents` (and `none`). Rows hold whole documents: each document goes
    into the first of the open rows with room for it (first fit over OPEN_ROWS rows, in
    order, so that short documents fill the gaps long ones leave; deterministic), a new row
    is opened when none has room, and the oldest open row is emitted, padded, when there are
    too many. `none` gives every document a row of its own. Each document's position ids
    start at 0, which is what keeps attention inside it (engine/parallel/model_stages.py) and
    what masks the label of its first token (no prediction across a document boundary). A
    document longer than seq_len fills whole rows and continues in the next one, its position
    ids restarting there. `sink(rows)` gets {"tokens", "positions" (uint32 [n, seq_len]),
    "row_tokens" (int32 [n]: real tokens per row) and with_targets "targets"}."""

    OPEN_ROWS = 16

    def __init__(self, seq_len: int, eos_id: int, pad_id: int, sink, with_ids: bool = False,
                 with_targets: bool = False, mode: str = "documents"):
        if mode not in ("documents", "none"):
            raise ValueError(f"data.packing: {mode!r} is not documents or none")
        self.seq_len, self.eos_id, self.pad_id, self.sink, self.mode = seq_len, eos_id, pad_id, sink, mode
        self.with_targets, self.with_ids = with_targets, with_ids
        self.rows = self.tokens = self.docs = self.split_docs = 0
        self.starts: list[list[str]] | None = [] if with_ids else None
        self._open: list[_OpenRow] = []
        self._closed: list[_OpenRow] = []
        self._last_fill = seq_len

    def _emit(self, row: _OpenRow) -> None:
        row.close()
        self._closed.append(row)
        if self.starts is not None:
            self.starts.append(row.ids)
        self.rows += 1
        self._last_fill = row.fill
        if len(self._closed) >= SINK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._closed:
            return
        out = {"tokens": np.stack([r.tokens for r in self._closed]),
               "positions": np.stack([r.positions for r in self._closed]),
               "row_tokens": np.array([r.fill for r in self._closed], dtype=np.int32)}
        if self.with_targets:
            out["targets"] = np.stack([r.targets for r in self._closed])
        self._closed = []
        self.sink(out)

    def _row_with_room(self, need: int) -> _OpenRow:
        for row in self._open:
            if self.seq_len - row.fill >= need:
                return row
        row = _OpenRow(self.seq_len, self.pad_id)
        self._open.append(row)
        limit = 1 if self.mode == "none" else self.OPEN_ROWS
        while len(self._open) > limit:
            self._emit(self._open.pop(0))
        return row

    def add(self, docs: Sequence[Sequence[int]], doc_ids: Sequence | None = None,
            targets: Sequence[np.ndarray] | None = None, eos_targets: Sequence[bool] | None = None) -> None:
        """As RowPacker.add."""
        for i, doc in enumerate(docs):
            tokens = np.empty(len(doc) + 1, dtype=np.uint32)
            tokens[:-1] = doc
            tokens[-1] = self.eos_id
            tgt = np.ones(len(tokens), dtype=np.uint8)
            if self.with_targets:
                tgt[:-1] = targets[i]
                tgt[-1] = 1 if eos_targets[i] else 0
            doc_id = str(doc_ids[i] if doc_ids is not None else None)
            full = (len(tokens) - 1) // self.seq_len * self.seq_len if len(tokens) > self.seq_len else 0
            self.split_docs += full > 0
            for lo in range(0, full, self.seq_len):  # whole rows of a long document, in order
                row = _OpenRow(self.seq_len, self.pad_id)
                row.place(tokens[lo:lo + self.seq_len], tgt[lo:lo + self.seq_len])
                if lo == 0:
                    row.ids.append(doc_id)
                self._emit(row)
            row = self._row_with_room(len(tokens) - full)
            row.place(tokens[full:], tgt[full:])
            if full == 0:
                row.ids.append(doc_id)
            if self.mode == "none" or row.fill == self.seq_len:
                self._open.remove(row)
                self._emit(row)
            self.tokens += len(tokens)
            self.docs += 1

    def finish(self) -> dict:
        """Emit the open rows; returns what RowPacker.finish does (last_row_tokens: the last
        row's real tokens; every row's are in the sunk row_tokens)."""
        for row in self._open:
            self._emit(row)
        self._open = []
        self._flush()
        return {"rows": self.rows, "tokens": self.tokens, "docs": self.docs, "split_docs": self.split_docs,
                "last_row_tokens": self._last_fill if self.rows else self.seq_len,
                "doc_ids": _ids_per_row(self.starts, self.rows)}


def make_packer(mode: str, seq_len: int, eos_id: int, pad_id: int, sink, with_ids: bool = False,
                with_targets: bool = False):
    """The packer of `data.packing` (documents | naive | none)."""
    if mode == "naive":
        return RowPacker(seq_len, eos_id, pad_id, sink, with_ids=with_ids, with_targets=with_targets)
    return DocumentPacker(seq_len, eos_id, pad_id, sink, with_ids=with_ids, with_targets=with_targets, mode=mode)


def num_tokens_per_row(rows: int, seq_len: int, last_row_tokens: int) -> np.ndarray:
    """Real (non-padding) tokens of each row of a naively packed stream: all full but the last."""
    out = np.full(rows, seq_len, dtype=np.int64)
    if rows:
        out[-1] = last_row_tokens
    return out


def labels_for(input_ids: np.ndarray, num_tokens: np.ndarray, positions: np.ndarray | None = None,
               targets: np.ndarray | None = None) -> np.ndarray:
    """Labels of packed rows: the tokens themselves, IGNORE_INDEX on the padding after each
    row's num_tokens (padding only ever follows the real tokens), on the first token of every
    document when positions are given (nothing predicts across a document boundary), and
    where targets (SFT: answers only) is 0."""
    labels = input_ids.astype(np.int64, copy=True)
    columns = np.arange(input_ids.shape[1])
    labels[columns[None, :] >= np.asarray(num_tokens)[:, None]] = IGNORE_INDEX
    if positions is not None:
        labels[positions == 0] = IGNORE_INDEX
    if targets is not None:
        labels[targets == 0] = IGNORE_INDEX
    return labels


def pack_token_lists(
    docs: Sequence[Sequence[int]], seq_len: int, eos_id: int, pad_id: int, doc_ids: Sequence | None = None,
    mode: str = "naive", targets: Sequence[np.ndarray] | None = None, eos_targets: Sequence[bool] | None = None,
) -> dict[str, np.ndarray]:
    """Pack one batch of documents into rows (make_packer): input_ids and labels (int64,
    [rows, seq_len]), num_tokens (real tokens per row), position_ids for `documents` packing
    and, with doc_ids, doc_ids."""
    parts: list[dict] = []
    packer = make_packer(mode, seq_len, eos_id, pad_id, parts.append, with_ids=doc_ids is not None,
                         with_targets=targets is not None)
    packer.add(docs, doc_ids, targets, eos_targets)
    done = packer.finish()

    def cat(key, dtype):
        if not parts or key not in parts[0]:
            return None
        return np.concatenate([p[key] for p in parts]).astype(dtype)

    input_ids = cat("tokens", np.int64)
    if input_ids is None:
        input_ids = np.zeros((0, seq_len), dtype=np.int64)
    num_tokens = cat("row_tokens", np.int64)
    if num_tokens is None:
        num_tokens = num_tokens_per_row(done["rows"], seq_len, done["last_row_tokens"])
    positions = cat("positions", np.int64) if mode == "documents" else None
    out = {"input_ids": input_ids, "num_tokens": num_tokens,
           "labels": labels_for(input_ids, num_tokens, positions, cat("targets", np.uint8))}
    if positions is not None:
        out["position_ids"] = positions
    if doc_ids is not None:
        out["doc_ids"] = np.array(done["doc_ids"], dtype=object)
    return out


def tokenize_and_pack(tokenizer, texts: Iterable, seq_len: int,
                      doc_ids: Sequence | None = None) -> tuple[dict[str, np.ndarray], int]:
    """clean → tokenize → pack one batch of documents; also returns the skipped count.
    With doc_ids (one per text), the rows get a doc_ids column (skipped rows' ids dropped)."""
    kept, index, skipped = clean_texts_indexed(texts)
    packed = pack_token_lists(
        tokenize_texts(tokenizer, kept), seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id,
        doc_ids=None if doc_ids is None else [doc_ids[i] for i in index],
    )
    docs_skipped = np.zeros(len(packed["num_tokens"]), dtype=np.int64)
    if len(docs_skipped):
        docs_skipped[0] = skipped
    packed["docs_skipped"] = docs_skipped
    return packed, skipped
