"""Validation during training (docs/data.md "Evaluation"): the global token-mean loss over the
held-out rows, on every layout, in global batches that every rank reads its dp share of.

The rows are always the same: the validation store's rows chunk by chunk in epoch 0's chunk
order (the order the store is built in, so the first evaluation waits only for the chunks it
reads), cut into global batches of train.global_batch_size rows, the first
`train.eval_max_batches` of them (None: all). The last batch is filled up with rows that have
no target (every label -100), so that every layout, pipeline schedules included, sees the
shape it trains on, and the fill counts nowhere. loss = sum of the batches' token losses / all
their target tokens, the same number at any world size; perplexity = exp(loss).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np

from raytune_llama.engine.data.order import chunk_order
from raytune_llama.engine.data.store import TokenStore
from raytune_llama.engine.packing import IGNORE_INDEX
from raytune_llama.trainer.batches import model_inputs


def eval_positions(store: TokenStore, global_batch: int, max_batches: Optional[int],
                   seed: int = 0, shuffle: bool = True) -> Iterator[list[tuple[int, int]]]:
    """The (chunk, row) pairs of each validation batch (the last one may be short)."""
    batch: list[tuple[int, int]] = []
    done = 0
    for chunk in chunk_order(store.num_chunks, seed, 0, shuffle):
        for row in range(store.chunk_rows(int(chunk))):  # waits while the chunk is being built
            batch.append((int(chunk), row))
            if len(batch) == global_batch:
                yield batch
                batch, done = [], done + 1
                if max_batches is not None and done >= max_batches:
                    return
    if batch:
        yield batch


def _fill(rows: dict[str, np.ndarray], want: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows up to `want` with rows that have no target (a short last batch)."""
    have = rows["input_ids"].shape[0]
    if have == want:
        return rows
    out = {}
    for key in ("input_ids", "labels", "position_ids"):
        if key not in rows:
            continue
        seq = rows[key].shape[1]
        value = {"input_ids": pad_id, "labels": IGNORE_INDEX}.get(key)
        extra = np.tile(np.arange(seq), (want - have, 1)) if key == "position_ids" else \
            np.full((want - have, seq), value, dtype=rows[key].dtype)
        out[key] = np.concatenate([rows[key], extra.astype(rows[key].dtype)])
    return out


def evaluate(engine, store: TokenStore, global_batch: int, max_batches: Optional[int],
             seed: int = 0, shuffle: bool = True) -> dict:
    """Collective: {"eval_loss", "eval_perplexity", "eval_tokens", "eval_batches"} over the
    validation rows (every rank calls it at the same step)."""
    per_rank = global_batch // engine.dp_size
    pad_id = int(store.spec["pad_token_id"])
    total_ce, total_tokens, batches = 0.0, 0, 0
    for positions in eval_positions(store, global_batch, max_batches, seed, shuffle):
        mine = positions[engine.dp_rank * per_rank:(engine.dp_rank + 1) * per_rank]
        rows = store.read(mine)  # empty for a rank past a short last batch: _fill makes up its rows
        out = engine.evaluate(model_inputs(_fill(rows, per_rank, pad_id)))
        total_ce += out["loss"] * out["tokens"]
        total_tokens += out["tokens"]
        batches += 1
    loss = total_ce / max(total_tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss), "eval_tokens": total_tokens,
            "eval_batches": batches}


def perplexity(loss: float) -> float:
    """exp(loss), capped where a float would overflow (a diverged run's loss)."""
    return math.exp(min(loss, 700.0))


def open_eval_store(spec: Optional[dict]) -> Optional[TokenStore]:
    """The validation store a run's loop_config names ({"path", "part"}), or None."""
    return None if not spec else TokenStore(spec["path"], part=spec["part"])


def eval_due(step: int, stop_at: int, max_steps: int, every: int, checkpoint_due: bool, keep_best: bool) -> bool:
    """Evaluate after this step? Every `every` steps, at the end of the run (and of this
    invocation), and at each checkpoint when the best one is kept by eval_loss."""
    if every and step % every == 0:
        return True
    return step in (stop_at, max_steps) or (keep_best and checkpoint_due)
