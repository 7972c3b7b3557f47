"""Validation batches (trainer/evaluation.py) and keeping the best checkpoint
(trainer/checkpoint_retention.py)."""
import json
import math

import numpy as np
import pytest

from raytune_llama.config import DataConfig
from raytune_llama.engine.data.store import TokenStore, build_all
from raytune_llama.engine.packing import IGNORE_INDEX
from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER
from raytune_llama.trainer.checkpoint_retention import best_checkpoint, record_and_prune
from raytune_llama.trainer.data_pipeline import open_token_store
from raytune_llama.trainer.evaluation import _fill, eval_due, eval_positions, evaluate

TOK = str(SHIPPED_TOKENIZER)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    d = tmp_path_factory.mktemp("ev")
    (d / "c.jsonl").write_text("".join(json.dumps({"text": f"line {i} " * (2 + i % 7)}) + "\n" for i in range(600)))
    data = DataConfig(path=str(d / "c.jsonl"), seq_len=32, eval_fraction=0.2, chunk_mb=0.005)
    store = build_all(open_token_store(data, TOK, d / "store").path, TOK)
    return TokenStore(store.path, part="eval")


def test_eval_batches_are_fixed_and_cover_the_held_out_rows_once(held_out):
    batches = list(eval_positions(held_out, 8, None))
    flat = [p for b in batches for p in b]
    assert len(flat) == len(set(flat)) == held_out.counts()["total_rows"] > 8
    assert all(len(b) == 8 for b in batches[:-1]) and 0 < len(batches[-1]) <= 8
    assert batches == list(eval_positions(held_out, 8, None))
    assert list(eval_positions(held_out, 8, 2)) == batches[:2]


def test_a_short_last_batch_is_filled_with_rows_without_targets(held_out):
    rows = held_out.read(list(eval_positions(held_out, 8, None))[0][:3])
    filled = _fill(rows, 5, pad_id=0)
    assert filled["input_ids"].shape == (5, 32) and (filled["labels"][3:] == IGNORE_INDEX).all()
    assert np.array_equal(filled["position_ids"][4], np.arange(32))
    assert np.array_equal(filled["labels"][:3], rows["labels"])


class _OneProcessEngine:
    """evaluate()'s engine contract for one process: token-mean of a fixed per-token loss."""

    dp_rank, dp_size = 0, 1

    def __init__(self):
        self.calls = []

    def evaluate(self, batch):
        labels = batch["labels"].numpy()
        targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
        self.calls.append(batch["input_ids"].shape[0])
        loss = float((labels[:, 1:][labels[:, 1:] != IGNORE_INDEX] % 7).sum()) / max(targets, 1)
        return {"loss": loss, "tokens": targets}


def test_eval_loss_is_the_token_mean_over_all_batches(held_out):
    engine = _OneProcessEngine()
    out = evaluate(engine, held_out, 8, None)
    every = held_out.read([p for b in eval_positions(held_out, 8, None) for p in b])["labels"][:, 1:]
    kept = every[every != IGNORE_INDEX]
    assert out["eval_tokens"] == kept.size
    assert out["eval_loss"] == pytest.approx(float((kept % 7).sum()) / kept.size)
    assert out["eval_perplexity"] == pytest.approx(math.exp(out["eval_loss"]))
    assert set(engine.calls) == {8}  # every batch in the training shape, the last one filled


def test_when_evaluation_runs():
    assert eval_due(20, 60, 60, every=20, checkpoint_due=False, keep_best=False)
    assert not eval_due(21, 60, 60, every=20, checkpoint_due=False, keep_best=False)
    assert eval_due(60, 60, 60, every=0, checkpoint_due=False, keep_best=False)   # the end
    assert eval_due(30, 30, 60, every=0, checkpoint_due=True, keep_best=False)    # end of this invocation
    assert eval_due(10, 60, 60, every=0, checkpoint_due=True, keep_best=True)     # scores every checkpoint
    assert not eval_due(10, 60, 60, every=0, checkpoint_due=True, keep_best=False)


def test_the_best_checkpoint_survives_besides_the_last_ones(tmp_path):
    losses = {1: 3.0, 2: 2.0, 3: 2.5, 4: 2.6, 5: None}
    for step, loss in losses.items():
        folder = tmp_path / f"checkpoint_2026-01-01_00-00-0{step}.000000"
        folder.mkdir()
        best = record_and_prune(tmp_path, folder, step, loss, keep_last=2)
    left = sorted(p.name[-8:-7] for p in tmp_path.glob("checkpoint_*"))
    assert left == ["2", "4", "5"]  # the best (step 2) and the last two
    assert best["step"] == 2 and best_checkpoint(tmp_path)["eval_loss"] == 2.0


def test_eval_path_is_a_store_of_its_own_read_whole(tmp_path):
    """data.eval_path: another corpus, read like data.path, its own store; every row is validation."""
    from raytune_llama.config import ConfigError, load_config

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"train {i} " * 4}) + "\n" for i in range(50)))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": f"valid {i} " * 4}) + "\n" for i in range(20)))
    data = DataConfig(path=str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "val.jsonl"), seq_len=32)
    train = open_token_store(data, TOK, tmp_path / "s")
    val = build_all(open_token_store(data, TOK, tmp_path / "s", path=data.eval_path).path, TOK)
    assert val.path != train.path and val.spec["eval_fraction"] == 0.0
    out = evaluate(_OneProcessEngine(), TokenStore(val.path, part="train"), 4, None)
    assert out["eval_tokens"] == val.counts()["tokens"] - val.counts()["documents"]  # all but each first token
    with pytest.raises(ConfigError, match="data.eval_path: .* does not exist"):
        load_config(None, [f"data.path={tmp_path / 'train.jsonl'}", f"data.eval_path={tmp_path}/nope.jsonl"]).validate()
