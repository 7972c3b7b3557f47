"""Tokenize documents and pack them into fixed-length training sequences.

Documents are joined with EOS and cut into `seq_len` blocks, so no token is lost at a block
boundary; only the last block of a batch is padded, and padding gets label -100 (the same
semantics as masking pad tokens in a plain HF loop). Pure numpy: the Ray layer calls these
from `map_batches`, and tests call them directly."""
from __future__ import annotations

from itertools import chain
from typing import Iterable, Sequence

import numpy as np

IGNORE_INDEX = -100  # label of tokens that do not count in the loss (HF convention)


def clean_texts(texts: Iterable) -> tuple[list[str], int]:
    """Keep non-empty string texts; return them and how many were skipped."""
    kept, skipped = [], 0
    for text in texts:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if isinstance(text, str) and text.strip():
            kept.append(text)
        else:
            skipped += 1
    return kept, skipped


def tokenize_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (EOS is added when packing)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def pack_token_lists(
    docs: Sequence[Sequence[int]], seq_len: int, eos_id: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Concatenate docs (each followed by EOS) and cut into rows of seq_len tokens.

    Returns input_ids and labels (int32 to halve the object-store footprint; shape
    [rows, seq_len]) and num_tokens (real, non-padding tokens per row)."""
    if not docs:
        empty = np.zeros((0, seq_len), dtype=np.int32)
        return {"input_ids": empty, "labels": empty.copy(), "num_tokens": np.zeros(0, dtype=np.int64)}
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
    return {
        "input_ids": input_ids.reshape(rows, seq_len),
        "labels": labels.reshape(rows, seq_len),
        "num_tokens": num_tokens,
    }


def tokenize_and_pack(tokenizer, texts: Iterable, seq_len: int) -> tuple[dict[str, np.ndarray], int]:
    """clean → tokenize → pack one batch of documents; also returns the skipped count."""
    kept, skipped = clean_texts(texts)
    packed = pack_token_lists(
        tokenize_texts(tokenizer, kept), seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    return packed, skipped
