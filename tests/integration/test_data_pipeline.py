"""The Ray Data pipeline on the shared head: JSONL, Parquet and an HF `datasets` source give
the same packed tokens, in the same order, run after run."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytune_llama.config import DataConfig
from raytune_llama.engine.packing import tokenize_and_pack
from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, iter_texts, load_tokenizer
from raytune_llama.trainer.data_pipeline import build_packed_dataset
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration
CORPUS = REPO / "examples" / "data" / "tiny_corpus.jsonl"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sources")
    texts = list(iter_texts(CORPUS))[:600]
    texts[5] = ""  # an empty row is skipped, not a crash
    (tmp / "jsonl").mkdir()
    for i in range(3):  # several files, read in order
        with open(tmp / "jsonl" / f"part-{i}.jsonl", "w") as f:
            for t in texts[i * 200:(i + 1) * 200]:
                f.write(json.dumps({"text": t, "id": 0}) + "\n")
    (tmp / "parquet").mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": texts[i * 200:(i + 1) * 200]}), tmp / "parquet" / f"part-{i}.parquet")
    return tmp, texts


def _packed(cfg: DataConfig):
    from raytune_llama.trainer.data_pipeline import build_packed_dataset

    ds, info = build_packed_dataset(cfg, str(SHIPPED_TOKENIZER))
    rows = ds.take_all()
    return np.stack([r["input_ids"] for r in rows]), info


def test_formats_agree_and_order_is_fixed(ray_head, sources):
    tmp, texts = sources
    batch = 100
    jsonl, info = _packed(DataConfig(path=str(tmp / "jsonl"), seq_len=64, tokenize_batch_size=batch))
    again, _ = _packed(DataConfig(path=str(tmp / "jsonl"), seq_len=64, tokenize_batch_size=batch))
    parquet, _ = _packed(DataConfig(path=str(tmp / "parquet"), seq_len=64, tokenize_batch_size=batch))
    hf, _ = _packed(DataConfig(path=str(tmp / "parquet"), format="hf", seq_len=64, tokenize_batch_size=batch))
    assert np.array_equal(jsonl, again)
    assert np.array_equal(jsonl, parquet) and np.array_equal(jsonl, hf)
    # Same tokens as packing each batch of documents directly, in file order.
    tok = load_tokenizer(SHIPPED_TOKENIZER)
    expected = np.concatenate([tokenize_and_pack(tok, texts[i:i + batch], 64)[0]["input_ids"]
                               for i in range(0, len(texts), batch)])
    assert np.array_equal(jsonl, expected)
    lengths = [len(x) + 1 for x in tok([t for t in texts if t], add_special_tokens=False)["input_ids"]]
    assert int(sum(r.sum() for r in (jsonl != tok.pad_token_id))) == sum(lengths)  # every token of every non-empty document, plus EOS


@pytest.fixture(scope="module")
def uneven_bad_source(tmp_path_factory):
    """Files of very unequal length: 40 good documents, one file of unusable rows (empty,
    whitespace, null, missing text), an empty file, one document 30x longer than a training
    sequence, and a document with invalid UTF-8 bytes."""
    tmp = tmp_path_factory.mktemp("uneven")
    d = tmp / "data"
    d.mkdir()
    good = [{"id": f"g{i}", "text": f"Story {i}: the fox met a dog near the river and they played."} for i in range(40)]
    (d / "a_good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    bad = [{"id": "b0", "text": ""}, {"id": "b1", "text": "   "}, {"id": "b2", "text": None}, {"id": "b3"}]
    (d / "b_bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    (d / "c_empty.jsonl").write_text("")
    (d / "d_long.jsonl").write_text(json.dumps({"id": "long", "text": " ".join(["fox"] * 2000)}) + "\n")
    (d / "e_bytes.jsonl").write_bytes(b'{"id": "utf", "text": "caf\xe9 and \xff bytes"}\n')
    return d, [r["id"] for r in good] + ["long", "utf"]


def test_bad_rows_are_skipped_and_counted(ray_head, uneven_bad_source):
    """Bad input: unusable rows are skipped and counted, invalid UTF-8 is decoded with replacement
    characters, a document longer than seq_len continues over several rows; a file that
    cannot be parsed is a clear error naming the path and column."""
    d, ids = uneven_bad_source
    ds, info = build_packed_dataset(DataConfig(path=str(d), seq_len=64, id_column="id"), str(SHIPPED_TOKENIZER))
    assert info.docs_skipped == 4 and info.has_doc_ids
    rows = ds.take_all()
    started = [i for r in rows for i in r["doc_ids"].split(",") if i]
    assert started == ids  # every usable document once, in file order
    assert sum(int(r["num_tokens"]) for r in rows) > 2000  # the long document was kept whole
    mixed = d.parent / "mixed.jsonl"
    mixed.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 7}) + "\n")
    with pytest.raises(ValueError, match=r"data.path: could not read and tokenize .*mixed.jsonl.*column 'text'"):
        build_packed_dataset(DataConfig(path=str(mixed), seq_len=64), str(SHIPPED_TOKENIZER))


def test_uneven_files_all_ranks_stop_at_the_same_step(ray_head, uneven_bad_source, tmp_path):
    """Bad input: 2 workers over files of unequal length, for more than one epoch: both ranks read
    the same global order and stop together at max_steps (no hang); the audit shows each
    epoch's documents in order and the second epoch starting again from the first."""
    from raytune_llama.config import load_config
    from raytune_llama.trainer.llama_trainer import LlamaTrainer

    d, ids = uneven_bad_source
    cfg = load_config(REPO / "examples" / "configs" / "tiny_cpu.yaml", [
        f"model.name_or_path={tmp_path}/model", f"data.path={d}", "data.id_column=id", "data.seq_len=64",
        f"run.storage_path={tmp_path}/runs", "run.name=uneven", "train.global_batch_size=8",
        "train.max_steps=7", "checkpoint.every_steps=0", "train.log_every=1",
        'parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"',
    ])
    summary = LlamaTrainer(cfg).fit()
    assert summary["final_step"] == 7 and summary["docs_skipped"] == 4
    per_epoch = summary["dataset_sequences"] // 8
    assert per_epoch < 7  # the run goes round the data more than once
    seen = summary["data_audit"]["ids"]
    second = seen.index("g0", 1)
    assert seen[:second] == ids[:second] and seen[second:] == ids[:len(seen) - second]


def _packed_digest(cpus: int, monkeypatch) -> tuple[int, str]:
    import hashlib

    import ray.data._internal.util as ray_data_util

    monkeypatch.setattr(ray_data_util, "_estimate_avail_cpus", lambda placement_group=None: cpus)
    rows, info = _packed(DataConfig(path=str(CORPUS), seq_len=64))
    return info.num_samples, hashlib.sha256(rows.tobytes()).hexdigest()


def test_packed_order_does_not_depend_on_the_cluster_size(ray_head, monkeypatch):
    """The global cursor indexes the packed order, so a run resumed on a cluster of another
    shape must see the same rows. Ray Data splits a read by the CPUs it sees (the corpus once
    packed into 8,904 rows on 2 CPUs and 8,905 on 5); tokenize batches now start at fixed
    document positions whatever the split."""
    digests = {cpus: _packed_digest(cpus, monkeypatch) for cpus in (2, 5)}
    assert digests[2] == digests[5], digests
