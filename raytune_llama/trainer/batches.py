"""Global-batch iteration over the materialized, ordered dataset with a global sample cursor.

Every worker walks the same sample order and takes its data-parallel slice of each global
batch, so the order does not depend on the world size and a run resumes at an exact sample."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np


def samples_per_epoch(num_samples: int, global_batch: int) -> int:
    """Samples used per epoch: whole global batches only."""
    return (num_samples // global_batch) * global_batch


def iter_global_batches(epoch_batches: Callable[[int], Iterable[dict]], *, num_samples: int,
                        global_batch: int, cursor: int) -> Iterator[dict]:
    """Yield global batches (numpy dicts) starting at sample `cursor`, epoch after epoch.

    epoch_batches(global_batch) must iterate one epoch in the fixed order, in whole batches
    of global_batch rows (e.g. a Ray DataIterator's iter_batches with drop_last=True)."""
    per_epoch = samples_per_epoch(num_samples, global_batch)
    if per_epoch == 0:
        raise ValueError(
            f"train.global_batch_size: {global_batch} is larger than the dataset "
            f"({num_samples} packed sequences); lower it or add data"
        )
    while True:
        skip = (cursor % per_epoch) // global_batch
        for i, batch in enumerate(epoch_batches(global_batch)):
            if i < skip:
                continue
            yield batch
            cursor += global_batch


def rank_slice(batch: dict, dp_rank: int, dp_size: int) -> dict:
    """This data-parallel rank's contiguous share of a global batch."""
    n = len(next(iter(batch.values())))
    per_rank = n // dp_size
    lo, hi = dp_rank * per_rank, (dp_rank + 1) * per_rank
    return {k: np.asarray(v[lo:hi]) for k, v in batch.items()}


def ray_epoch_batches(data_iterator) -> Callable[[int], Iterable[dict]]:
    """epoch_batches for a Ray DataIterator (one full, ordered pass per call)."""

    def epoch(global_batch: int) -> Iterable[dict]:
        return data_iterator.iter_batches(batch_size=global_batch, batch_format="numpy", drop_last=True)

    return epoch
