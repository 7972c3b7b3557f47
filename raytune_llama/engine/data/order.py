"""The run's sample order over a token store: seeded per epoch, the same at every world size.

Epoch e visits the store's chunks in a permutation seeded by (seed, e), grouped into windows
of `data.shuffle_window` chunks, and the rows of each window in a permutation seeded by
(seed, e, window). An epoch is floor(rows / global_batch)
whole global batches; the few rows left over are skipped in that epoch (a different few in
the next one). Sample s of the run (the cursor counts samples from the start of training,
across epochs) therefore has one place, computed from the chunks' row counts alone: resuming
at any cursor reads no consumed data, whatever the world size or cluster shape that stopped
(docs/data.md "Order, shuffling and resume").

While the store is still being built, epoch 0 needs only the windows up to the current batch:
the build tokenizes chunks in epoch 0's order, so training starts after the first window."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np


def chunk_order(num_chunks: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order in which epoch `epoch` visits the chunks."""
    if not shuffle:
        return np.arange(num_chunks)
    return np.random.default_rng([seed, epoch, 1]).permutation(num_chunks)


@lru_cache(maxsize=64)
def row_order(rows: int, seed: int, epoch: int, window: int, shuffle: bool) -> np.ndarray:
    """The order in which epoch `epoch` visits the rows of its window `window`."""
    if not shuffle:
        return np.arange(rows)
    return np.random.default_rng([seed, epoch, window, 2]).permutation(rows)


class SampleOrder:
    """cursor → the (chunk, row) of every sample of the global batch starting there.

    Epoch e takes the chunks in chunk_order and groups them into windows of `window`
    consecutive chunks; the rows of a window are shuffled together (row_order over the
    window), so a global batch mixes rows from `window` chunks drawn from anywhere in the
    corpus, not from one region of one file."""

    def __init__(self, store, global_batch: int, seed: int = 0, shuffle: bool = True, window: int = 16,
                 wait_timeout_s: Optional[float] = None):
        self.store, self.global_batch, self.seed, self.shuffle = store, global_batch, seed, shuffle
        self.window = max(1, int(window)) if shuffle else 1
        self.wait_timeout_s = wait_timeout_s
        self._epochs: dict[int, _EpochLayout] = {}

    @classmethod
    def for_data(cls, store, data, global_batch: int) -> "SampleOrder":
        """The run's order: seed, shuffle and window from the `data` config section."""
        return cls(store, global_batch, data.shuffle_seed, data.shuffle, data.shuffle_window)

    def samples_per_epoch(self) -> Optional[int]:
        """Whole global batches per epoch, once the store is complete (else None)."""
        counts = self.store.counts()
        return None if counts is None else self._per_epoch(counts["total_rows"])

    def _per_epoch(self, total_rows: int) -> int:
        per_epoch = total_rows // self.global_batch * self.global_batch
        if per_epoch == 0:
            raise ValueError(f"train.global_batch_size: {self.global_batch} is larger than the dataset "
                             f"({total_rows} packed sequences); lower it, shorten data.seq_len, or add data")
        return per_epoch

    def _rows(self, chunk: int) -> int:
        counts = self.store.counts()
        if counts is not None:
            return counts["rows"][chunk]
        return self.store.chunk_rows(chunk, self.wait_timeout_s)  # waits while the chunk is built

    def epoch_and_offset(self, cursor: int) -> tuple[int, int]:
        """Which epoch the global batch at `cursor` belongs to, and its first sample in it."""
        counts = self.store.counts()
        if counts is None:
            need, acc = cursor + self.global_batch, 0
            order = chunk_order(self.store.num_chunks, self.seed, 0, self.shuffle)
            for lo in range(0, len(order), self.window):
                acc += sum(self._rows(int(c)) for c in order[lo:lo + self.window])  # a whole window
                if acc >= need:
                    return 0, cursor
            total = acc  # every chunk is built now
        else:
            total = counts["total_rows"]
        return divmod(cursor, self._per_epoch(total))

    def _layout(self, epoch: int, upto: int) -> "_EpochLayout":
        """The epoch's windows, covering at least `upto` rows (all of them once the store is complete)."""
        layout = self._epochs.get(epoch)
        if layout is not None and (layout.complete or layout.window_end[-1] >= upto):
            return layout
        order = chunk_order(self.store.num_chunks, self.seed, epoch, self.shuffle)
        complete = self.store.counts() is not None
        total = 0
        rows: list[int] = []
        for lo in range(0, len(order), self.window):
            if not complete and total >= upto:
                break
            window_rows = [self._rows(int(c)) for c in order[lo:lo + self.window]]
            rows += window_rows
            total += sum(window_rows)
        if len(self._epochs) > 2:
            self._epochs.clear()
        self._epochs[epoch] = _EpochLayout(order[: len(rows)], np.asarray(rows, dtype=np.int64), self.window,
                                           complete or len(rows) == len(order))
        return self._epochs[epoch]

    def positions(self, cursor: int, lo: int = 0, hi: Optional[int] = None) -> list[tuple[int, int]]:
        """(chunk, row) of samples lo..hi-1 of the global batch at `cursor`."""
        return self.locate(cursor, lo, hi)[1]

    def locate(self, cursor: int, lo: int = 0, hi: Optional[int] = None) -> tuple[int, list[tuple[int, int]]]:
        """(epoch, positions(cursor, lo, hi)): the epoch of the global batch at `cursor` too."""
        hi = self.global_batch if hi is None else hi
        epoch, offset = self.epoch_and_offset(cursor)
        wanted = offset + np.arange(lo, hi, dtype=np.int64)
        layout = self._layout(epoch, int(wanted.max(initial=-1)) + 1)
        return epoch, [layout.locate(int(p), self.seed, epoch, self.shuffle) for p in wanted]


class _EpochLayout:
    """One epoch's chunks in visiting order, their rows, grouped into windows."""

    def __init__(self, order: np.ndarray, rows: np.ndarray, window: int, complete: bool):
        self.order, self.rows, self.window, self.complete = order, rows, window, complete
        self.chunk_end = np.cumsum(rows)
        starts = np.arange(0, len(order), window)
        self.window_end = self.chunk_end[np.minimum(starts + window, len(order)) - 1] if len(order) else np.zeros(0)

    def locate(self, position: int, seed: int, epoch: int, shuffle: bool) -> tuple[int, int]:
        w = int(np.searchsorted(self.window_end, position, side="right"))
        first = w * self.window
        window_start = int(self.chunk_end[first - 1]) if first else 0
        size = int(self.window_end[w]) - window_start
        within = int(row_order(size, seed, epoch, w, shuffle)[position - window_start])
        k = int(np.searchsorted(self.chunk_end, window_start + within, side="right"))
        chunk_start = int(self.chunk_end[k - 1]) if k else 0
        return int(self.order[k]), window_start + within - chunk_start
