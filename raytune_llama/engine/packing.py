"""Tokenize documents and pack them into fixed-length training sequences.

Documents are joined with EOS and cut into `seq_len` blocks, so no token is lost at a block
boundary (a document longer than seq_len simply continues in the next row); only the last
block of a batch is padded, and padding gets label -100 (the same semantics as masking pad
tokens in a plain HF loop). Pure numpy: the Ray layer calls these from `map_batches`, and
tests call them directly.

Per-row bookkeeping columns: `docs_skipped` (rows of the source batch that were not usable
text: empty, missing, not a string; carried on the batch's first packed row so a sum over
the dataset counts them) and, when documents have ids, `doc_ids` (comma-joined ids of the
documents that START in the row: every document is listed in exactly one row, which lets a
run prove that no document was trained on twice or skipped)."""
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


def pack_token_lists(
    docs: Sequence[Sequence[int]], seq_len: int, eos_id: int, pad_id: int, doc_ids: Sequence | None = None,
) -> dict[str, np.ndarray]:
    """Concatenate docs (each followed by EOS) and cut into rows of seq_len tokens.

    Returns input_ids and labels (int32 to halve the object-store footprint; shape
    [rows, seq_len]), num_tokens (real, non-padding tokens per row) and, with doc_ids,
    doc_ids (comma-joined ids of the documents starting in each row)."""
    if not docs:
        empty = np.zeros((0, seq_len), dtype=np.int32)
        out = {"input_ids": empty, "labels": empty.copy(), "num_tokens": np.zeros(0, dtype=np.int64)}
        if doc_ids is not None:
            out["doc_ids"] = np.zeros(0, dtype=object)
        return out
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    eos_at = np.cumsum(lengths + 1) - 1  # each document is followed by one EOS
    stream = np.empty(int(eos_at[-1]) + 1, dtype=np.int64)
    is_token = np.ones(len(stream), dtype=bool)
    is_token[eos_at] = False
    stream[is_token] = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum()))
    stream[eos_at] = eos_id
    rows = -(-len(stream) // seq_len)
    input_ids = np.full(rows * seq_len, pad_id, dtype=np.int32)
    input_ids[: len(stream)] = stream
    labels = np.full(rows * seq_len, IGNORE_INDEX, dtype=np.int32)
    labels[: len(stream)] = stream
    num_tokens = np.full(rows, seq_len, dtype=np.int64)
    num_tokens[-1] = len(stream) - (rows - 1) * seq_len
    out = {
        "input_ids": input_ids.reshape(rows, seq_len),
        "labels": labels.reshape(rows, seq_len),
        "num_tokens": num_tokens,
    }
    if doc_ids is not None:
        start_row = (eos_at - lengths) // seq_len  # the row holding each document's first token
        per_row: list[list[str]] = [[] for _ in range(rows)]
        for doc_id, row in zip(doc_ids, start_row):
            per_row[int(row)].append(str(doc_id))
        out["doc_ids"] = np.array([",".join(ids) for ids in per_row], dtype=object)
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
