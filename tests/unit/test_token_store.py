"""The packed token store and the run's sample order, without Ray: chunks cover every document
once, tokens match packing the documents directly, the seeded order is the same at every world
size, differs per epoch, and resumes at any cursor without reading consumed rows."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytune_llama.config import DataConfig
from raytune_llama.engine.data import store as store_mod
from raytune_llama.engine.data.order import SampleOrder
from raytune_llama.engine.data.sources import iter_chunk_documents, list_chunks
from raytune_llama.engine.data.store import StoreBuildError, TokenStore, build_all, build_chunk, record_build_error
from raytune_llama.engine.packing import labels_for, make_packer, num_tokens_per_row
from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, iter_texts, load_tokenizer
from raytune_llama.trainer.batches import rank_batch
from raytune_llama.trainer.data_pipeline import open_token_store
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CORPUS = REPO / "examples" / "data" / "tiny_corpus.jsonl"
TOK = str(SHIPPED_TOKENIZER)


def _built(cfg: DataConfig, root) -> TokenStore:
    return build_all(open_token_store(cfg, TOK, root).path, TOK)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The bundled corpus with ids, and a few unusable rows and a non-JSON line."""
    d = tmp_path_factory.mktemp("corpus")
    texts = list(iter_texts(CORPUS))[:900]
    lines = [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(texts)]
    lines[10] = json.dumps({"id": "empty", "text": ""})
    lines[20] = "this line is not JSON"
    lines[30] = json.dumps({"id": "num", "text": 7})
    (d / "a.jsonl").write_text("\n".join(lines[:500]) + "\n")
    (d / "b.jsonl").write_text("\n".join(lines[500:]) + "\n")
    good = [f"d{i}" for i in range(900) if i not in (10, 20, 30)]
    return d, texts, good


@pytest.fixture(scope="module")
def store(corpus, tmp_path_factory):
    d, _, _ = corpus
    return _built(DataConfig(path=str(d), seq_len=32, chunk_mb=0.05, id_column="id"), tmp_path_factory.mktemp("s"))


def test_jsonl_chunks_cover_every_line_once(tmp_path):
    """Byte ranges cut lines anywhere: a line belongs to the range its first byte is in."""
    rows = [json.dumps({"text": "x" * (i % 37), "id": i}) for i in range(400)]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(rows) + "\n")
    for chunk_bytes in (1, 7, 100, 512, 4096, 10**9):
        chunks, _ = list_chunks(str(f), "jsonl", chunk_bytes)
        ids = [i for c in chunks for _, batch in iter_chunk_documents(c, "text", "id", 50) for i in batch]
        assert ids == list(range(400)), chunk_bytes


def test_chunks_hold_the_documents_packed_in_order(store, corpus):
    """Concatenating each chunk's rows gives exactly the documents packed chunk by chunk; every
    usable document starts in exactly one row; bad rows are counted."""
    _, texts, good = corpus
    counts = store.counts()
    assert counts["docs_skipped"] == 3 and counts["documents"] == len(good) and store.num_chunks > 5
    tok = load_tokenizer(SHIPPED_TOKENIZER)
    by_id = {f"d{i}": t for i, t in enumerate(texts)}
    started = []
    for c in range(store.num_chunks):
        ids = json.loads((store_mod.chunk_dir(store.path, c) / "doc_ids.json").read_text())
        docs = [i for cell in ids for i in cell.split(",") if i]
        started += docs
        expected: list = []
        packer = make_packer(store.packing, 32, tok.eos_token_id, tok.pad_token_id, expected.append)
        packer.add(tok([by_id[i] for i in docs], add_special_tokens=False)["input_ids"])
        packer.finish()
        rows = store.read([(c, r) for r in range(store.chunk_rows(c))])
        assert np.array_equal(rows["input_ids"], np.concatenate([e["tokens"] for e in expected]).astype(np.int64))
    assert started == good
    total = sum(len(x) + 1 for x in tok([by_id[i] for i in good], add_special_tokens=False)["input_ids"])
    assert counts["tokens"] == total


def test_labels_mask_exactly_the_padding():
    ids = np.arange(12).reshape(2, 6)
    labels = labels_for(ids, num_tokens_per_row(2, 6, 4))
    assert labels[0].tolist() == list(range(6)) and labels[1].tolist() == [6, 7, 8, 9, -100, -100]


def _epoch(order: SampleOrder, epoch: int) -> list:
    per = order.samples_per_epoch()
    return [p for c in range(epoch * per, (epoch + 1) * per, order.global_batch) for p in order.positions(c)]


def test_order_is_a_seeded_shuffle_the_same_at_every_world_size(store):
    order = SampleOrder(store, 8, seed=3, shuffle=True)
    per = order.samples_per_epoch()
    every = {(c, r) for c in range(store.num_chunks) for r in range(store.chunk_rows(c))}
    first, second = _epoch(order, 0), _epoch(order, 1)
    assert len(set(first)) == len(first) == per and set(first) <= every  # each row at most once
    assert first != second  # a new order every epoch
    assert first == _epoch(SampleOrder(store, 8, seed=3, shuffle=True), 0)  # deterministic
    assert first != _epoch(SampleOrder(store, 8, seed=4, shuffle=True), 0)
    unshuffled = _epoch(SampleOrder(store, 8, seed=3, shuffle=False), 0)
    assert unshuffled == sorted(unshuffled)
    # A window of chunks is shuffled together: batches mix chunks; a window of 1 does not.
    mixed = [len({c for c, _ in order.positions(8 * b)}) for b in range(20)]
    alone = [len({c for c, _ in SampleOrder(store, 8, seed=3, window=1).positions(8 * b)}) for b in range(20)]
    assert np.mean(mixed) > 3 and max(alone) <= 2
    # The dp shares of every world size put together are the same global batch.
    for cursor in (0, 8 * 17, per + 8 * 5):
        whole = store.read(order.positions(cursor))["input_ids"]
        for dp in (1, 2, 4, 8):
            parts = [rank_batch(store, order, cursor, r, dp).rows["input_ids"] for r in range(dp)]
            assert np.array_equal(np.concatenate(parts), whole)


def test_resume_reads_no_consumed_rows(store, monkeypatch):
    """A fresh order at 90% of epoch 1 gives the same rows as walking there, and opens only the
    chunks that batch's own rows are in."""
    walked = SampleOrder(store, 8, seed=0, shuffle=True)
    cursor = walked.samples_per_epoch() + int(0.9 * walked.samples_per_epoch()) // 8 * 8
    expected = walked.positions(cursor)
    opened = []
    real = np.memmap
    monkeypatch.setattr(store_mod.np, "memmap", lambda path, **kw: opened.append(str(path)) or real(path, **kw))
    fresh = TokenStore(store.path)
    batch = rank_batch(fresh, SampleOrder(fresh, 8, seed=0, shuffle=True), cursor, 1, 2)
    assert np.array_equal(batch.rows["input_ids"], store.read(expected[4:])["input_ids"])
    tokens_opened = {f for f in opened if f.endswith("/tokens.bin")}
    assert len(tokens_opened) == len({c for c, _ in expected[4:]}) <= 4  # only this rank's chunks' tokens


def test_a_reader_waits_for_a_chunk_and_sees_a_failed_build(corpus, tmp_path):
    d, _, _ = corpus
    s = open_token_store(DataConfig(path=str(d), seq_len=32, chunk_mb=0.05), TOK, tmp_path)
    build_chunk(s.path, 0, TOK)
    order = SampleOrder(TokenStore(s.path), 8, seed=0, shuffle=False, wait_timeout_s=0.5)
    assert order.positions(0)[0] == (0, 0)  # chunk 0 is enough for the first batch
    with pytest.raises(TimeoutError, match="chunk 1 not built"):
        order.positions(8 * 10**4)
    record_build_error(s.path, "data.path: could not read /x/b.jsonl (OSError: boom); remove or replace the file")
    with pytest.raises(StoreBuildError, match="could not read /x/b.jsonl"):
        SampleOrder(TokenStore(s.path), 8, seed=0, shuffle=False).positions(8 * 10**4)


def test_same_content_reuses_the_store_and_a_change_makes_a_new_one(corpus, tmp_path):
    d, _, _ = corpus
    cfg = DataConfig(path=str(d), seq_len=32, chunk_mb=0.05)
    a = open_token_store(cfg, TOK, tmp_path)
    assert open_token_store(cfg, TOK, tmp_path).path == a.path
    assert open_token_store(DataConfig(path=str(d), seq_len=64, chunk_mb=0.05), TOK, tmp_path).path != a.path
    extra = d.parent / "changed"
    extra.mkdir()
    (extra / "a.jsonl").write_text((d / "a.jsonl").read_text())
    b = open_token_store(DataConfig(path=str(extra), seq_len=32, chunk_mb=0.05), TOK, tmp_path)
    (extra / "a.jsonl").write_text((d / "a.jsonl").read_text() + json.dumps({"text": "one more"}) + "\n")
    assert open_token_store(DataConfig(path=str(extra), seq_len=32, chunk_mb=0.05), TOK, tmp_path).path != b.path


def test_parquet_and_hf_sources_give_the_jsonl_tokens(corpus, tmp_path):
    """The same documents as Parquet (row groups), a local HF dataset (Arrow cache rows) and a
    streaming HF dataset (source shards) give the same packed rows when each is one chunk."""
    _, texts, _ = corpus
    docs = [t for t in texts[:300] if t]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "p" / "a.parquet", row_group_size=40)
    big = 10**3  # MB: one chunk each

    def rows(path, fmt, **kw):
        s = _built(DataConfig(path=str(path), format=fmt, seq_len=32, chunk_mb=big, **kw), tmp_path / "stores")
        assert s.num_chunks == 1
        return s.read([(0, r) for r in range(s.chunk_rows(0))])["input_ids"]

    jsonl = rows(tmp_path / "j", "jsonl")
    assert np.array_equal(rows(tmp_path / "p", "parquet"), jsonl)
    assert np.array_equal(rows(tmp_path / "p", "hf"), jsonl)
    assert np.array_equal(rows(tmp_path / "p", "hf", hf_streaming=True), jsonl)
