"""Tokenize documents and pack them into fixed-length training sequences.

Documents are joined with EOS and cut into `seq_len` rows, so no token is lost at a row
boundary (a document longer than seq_len simply continues in the next row); only the last
row of a packed stream is padded, and padding gets label -100 (the same semantics as masking
pad tokens in a plain HF loop). Pure numpy: the token store (engine/data/store.py) streams a
whole chunk of the corpus through one RowPacker; tests call these directly.

When documents have ids, each row records the comma-joined ids of the documents that START
in it: every document is listed in exactly one row, which lets a run prove that no document
was trained on twice or skipped (docs/data.md "Exactly-once audit")."""
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


class RowPacker:
    """Documents in, rows of exactly seq_len tokens out: each document is followed by EOS and
    the stream is cut every seq_len tokens, the tail of one batch carried into the next, so
    only the last row of everything packed is padded. `sink(rows)` receives each batch's
    full rows (uint32 [n, seq_len]). With ids, remembers which row each document starts in."""

    def __init__(self, seq_len: int, eos_id: int, pad_id: int, sink, with_ids: bool = False):
        self.seq_len, self.eos_id, self.pad_id, self.sink = seq_len, eos_id, pad_id, sink
        self.carry = np.zeros(0, dtype=np.uint32)
        self.rows = 0
        self.tokens = 0  # stream length so far: real tokens + one EOS per document
        self.docs = 0
        self.starts: list[list[str]] | None = [] if with_ids else None

    def add(self, docs: Sequence[Sequence[int]], doc_ids: Sequence | None = None) -> None:
        if not docs:
            return
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        eos_at = np.cumsum(lengths + 1) - 1  # each document is followed by one EOS
        stream = np.empty(int(eos_at[-1]) + 1, dtype=np.uint32)
        is_token = np.ones(len(stream), dtype=bool)
        is_token[eos_at] = False
        stream[is_token] = np.fromiter(chain.from_iterable(docs), dtype=np.uint32, count=int(lengths.sum()))
        stream[eos_at] = self.eos_id
        if self.starts is not None:
            first_row = (self.tokens + eos_at - lengths) // self.seq_len  # the row of each first token
            for doc_id, row in zip(doc_ids if doc_ids is not None else [None] * len(docs), first_row):
                while len(self.starts) <= row:
                    self.starts.append([])
                self.starts[int(row)].append(str(doc_id))
        self.tokens += len(stream)
        self.docs += len(docs)
        buf = np.concatenate([self.carry, stream])
        full = len(buf) // self.seq_len
        if full:
            self.sink(buf[: full * self.seq_len].reshape(full, self.seq_len))
            self.rows += full
        self.carry = buf[full * self.seq_len:]

    def finish(self) -> dict:
        """Pad and emit the last partial row; returns {rows, tokens, docs, last_row_tokens,
        doc_ids (comma-joined ids starting in each row, or None)}."""
        last = self.seq_len
        if len(self.carry):
            last = len(self.carry)
            row = np.full(self.seq_len, self.pad_id, dtype=np.uint32)
            row[:last] = self.carry
            self.sink(row.reshape(1, self.seq_len))
            self.rows += 1
            self.carry = self.carry[:0]
        ids = None
        if self.starts is not None:
            ids = [",".join(cell) for cell in self.starts] + [""] * (self.rows - len(self.starts))
        return {"rows": self.rows, "tokens": self.tokens, "docs": self.docs, "last_row_tokens": last,
                "doc_ids": ids}


def num_tokens_per_row(rows: int, seq_len: int, last_row_tokens: int) -> np.ndarray:
    """Real (non-padding) tokens of each row of a packed stream: all full but the last."""
    out = np.full(rows, seq_len, dtype=np.int64)
    if rows:
        out[-1] = last_row_tokens
    return out


def labels_for(input_ids: np.ndarray, num_tokens: np.ndarray) -> np.ndarray:
    """Labels of packed rows: the tokens themselves, IGNORE_INDEX on the padding after each
    row's num_tokens (padding only ever follows the real tokens)."""
    labels = input_ids.astype(np.int64, copy=True)
    positions = np.arange(input_ids.shape[1])
    labels[positions[None, :] >= np.asarray(num_tokens)[:, None]] = IGNORE_INDEX
    return labels


def pack_token_lists(
    docs: Sequence[Sequence[int]], seq_len: int, eos_id: int, pad_id: int, doc_ids: Sequence | None = None,
) -> dict[str, np.ndarray]:
    """Pack one batch of documents into rows (RowPacker): input_ids and labels (int64,
    [rows, seq_len]), num_tokens (real tokens per row) and, with doc_ids, doc_ids."""
    rows: list[np.ndarray] = []
    packer = RowPacker(seq_len, eos_id, pad_id, rows.append, with_ids=doc_ids is not None)
    packer.add(docs, doc_ids)
    done = packer.finish()
    input_ids = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, seq_len), dtype=np.int64)
    num_tokens = num_tokens_per_row(done["rows"], seq_len, done["last_row_tokens"])
    out = {"input_ids": input_ids, "labels": labels_for(input_ids, num_tokens), "num_tokens": num_tokens}
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
