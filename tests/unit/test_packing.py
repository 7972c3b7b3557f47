"""Tokenize + pack: exact token counts, label masking, nothing lost at block boundaries."""
import numpy as np
import pytest

from raytune_llama.engine.loss import IGNORE_INDEX
from raytune_llama.engine.packing import clean_texts, pack_token_lists, tokenize_and_pack
from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, load_tokenizer

EOS, PAD = 2, 0


def test_pack_keeps_every_token_in_order_across_blocks():
    docs = [[10, 11, 12], [20], [30, 31, 32, 33, 34, 35, 36]]  # 3+1+7 tokens + 3 EOS = 14
    out = pack_token_lists(docs, seq_len=4, eos_id=EOS, pad_id=PAD)
    assert out["input_ids"].shape == (4, 4)
    flat = out["input_ids"].reshape(-1)
    expected = [10, 11, 12, EOS, 20, EOS, 30, 31, 32, 33, 34, 35, 36, EOS]
    assert flat[:14].tolist() == expected
    assert flat[14:].tolist() == [PAD, PAD]
    assert out["num_tokens"].tolist() == [4, 4, 4, 2]
    assert int(out["num_tokens"].sum()) == 14


def test_labels_mask_only_padding():
    out = pack_token_lists([[5, 6, 7]], seq_len=6, eos_id=EOS, pad_id=PAD)
    assert out["labels"].tolist() == [[5, 6, 7, EOS, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["input_ids"].tolist() == [[5, 6, 7, EOS, PAD, PAD]]


def test_document_longer_than_sequence_is_split_not_dropped():
    doc = list(range(100, 125))
    out = pack_token_lists([doc], seq_len=8, eos_id=EOS, pad_id=PAD)
    assert out["input_ids"].reshape(-1)[:26].tolist() == doc + [EOS]
    assert out["input_ids"].shape[0] == 4


def test_exact_fit_has_no_padding_row():
    out = pack_token_lists([[1, 3, 4], [5, 6, 7]], seq_len=4, eos_id=EOS, pad_id=PAD)
    assert out["num_tokens"].tolist() == [4, 4]
    assert (out["labels"] != IGNORE_INDEX).all()


def test_empty_input():
    out = pack_token_lists([], seq_len=4, eos_id=EOS, pad_id=PAD)
    assert out["input_ids"].shape == (0, 4) and out["num_tokens"].shape == (0,)


def test_bad_rows_are_skipped_and_counted():
    kept, skipped = clean_texts(["ok", "", None, "   ", b"bytes \xff here", 7])
    assert kept[0] == "ok" and kept[1].startswith("bytes ") and len(kept) == 2
    assert skipped == 4


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SHIPPED_TOKENIZER)


def test_tokenize_and_pack_counts_match_tokenizer(tokenizer):
    texts = ["One sunny morning, Ada walked to the forest.", "", "The fox found an old map."]
    packed, skipped = tokenize_and_pack(tokenizer, texts, seq_len=16)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts if t]
    assert skipped == 1
    assert int(packed["num_tokens"].sum()) == sum(lengths) + len(lengths)  # + one EOS per doc
    real = packed["input_ids"].reshape(-1)[: int(packed["num_tokens"].sum())]
    assert (real == tokenizer.eos_token_id).sum() == len(lengths)
    assert np.all(packed["labels"].reshape(-1)[int(packed["num_tokens"].sum()):] == IGNORE_INDEX)
