"""Rank statistics for comparing the planner's predictions with measurements (pure Python):
`raytune-llama tune-layout` and bench/planner_accuracy.py."""
from __future__ import annotations

import math
from typing import Optional, Sequence


def ranks(values: Sequence[Optional[float]]) -> list[Optional[int]]:
    """1-based competition ranks (1, 2, 2, 4) of the values, smallest first; None stays None."""
    known = [v for v in values if v is not None]
    return [None if v is None else 1 + sum(1 for w in known if w < v) for v in values]


def _average_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1  # ties share the mean of their positions
        i = j + 1
    return out


def spearman(xs: Sequence[Optional[float]], ys: Sequence[Optional[float]]) -> Optional[float]:
    """Spearman's rank correlation of the pairs where both values are known (ties get average
    ranks, i.e. Pearson's correlation of the ranks); None with fewer than 2 pairs or when one
    side has no spread."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < 2:
        return None
    rx, ry = _average_ranks([p[0] for p in pairs]), _average_ranks([p[1] for p in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)
