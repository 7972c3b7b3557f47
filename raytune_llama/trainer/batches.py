"""This rank's rows of each global batch, read straight from the token store.

Every rank computes the same global order (engine/data/order.py: a function of the store,
the seed and the global batch, never of the world size), takes the positions of its own
data-parallel share of the batch, and reads only those rows; tensor / pipeline peers of one
dp rank read the same rows. A run resumes at an exact sample without reading anything before
it (docs/data.md "Order, shuffling and resume")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from raytune_llama.engine.data.order import SampleOrder
from raytune_llama.engine.data.store import TokenStore


MODEL_INPUTS = ("input_ids", "labels", "position_ids")


def model_inputs(rows: dict[str, np.ndarray]) -> dict:
    """The tensors a model step takes from a batch's rows: input_ids, labels and, under
    document packing, position_ids (int64 torch tensors)."""
    import torch

    # One int64 copy at most: torch.from_numpy shares the array's memory, and rows that are a
    # view of a store's read-only memory map must not be shared (torch warns "The given NumPy
    # array is not writable"); astype copies anyway where the dtype changes.
    return {k: torch.from_numpy(rows[k].astype(np.int64, copy=not rows[k].flags.writeable))
            for k in MODEL_INPUTS if k in rows}


@dataclass
class RankBatch:
    rows: dict[str, np.ndarray]
    """input_ids, labels, num_tokens (position_ids under document packing, doc_ids with
    data.id_column) of this dp rank's rows."""
    global_tokens: int
    """Real (non-padding) tokens of the whole global batch, for throughput and MFU."""
    epoch: int


def rank_batch(store: TokenStore, order: SampleOrder, cursor: int, dp_rank: int, dp_size: int,
               with_ids: bool = False) -> RankBatch:
    """The global batch at `cursor`: this dp rank's contiguous share of its rows."""
    per_rank = order.global_batch // dp_size
    epoch, positions = order.locate(cursor)  # one walk of the epoch layout for both
    mine = store.read(positions[dp_rank * per_rank:(dp_rank + 1) * per_rank], with_ids=with_ids)
    return RankBatch(mine, store.tokens_of(positions), epoch)


def iter_rank_batches(store: TokenStore, order: SampleOrder, cursor: int, dp_rank: int, dp_size: int,
                      with_ids: bool = False) -> Iterator[RankBatch]:
    """rank_batch at cursor, cursor + global_batch, ... (epoch after epoch, without end)."""
    while True:
        yield rank_batch(store, order, cursor, dp_rank, dp_size, with_ids)
        cursor += order.global_batch
