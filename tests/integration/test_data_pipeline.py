"""The data pipeline on the shared head: Ray Data builds the token store in the background (the
same tokens as building it in one process), a resubmission tokenizes nothing again, bad rows
are skipped and counted, an unreadable file is named, and runs read the seeded order exactly,
across epochs and across a resume at another world size."""
import gzip
import json

import numpy as np
import pytest

from raytune_llama.config import DataConfig, load_config
from raytune_llama.engine.data.order import SampleOrder
from raytune_llama.engine.data.store import TokenStore, build_all
from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, iter_texts
from raytune_llama.trainer.data_pipeline import StoreBuilder, open_token_store, wait_for_first_batch
from tests.integration.conftest import REPO
from tests.integration.tiny_run import seeded_order_ids

pytestmark = pytest.mark.integration
CORPUS = REPO / "examples" / "data" / "tiny_corpus.jsonl"
TOK = str(SHIPPED_TOKENIZER)


def _ray_build(cfg: DataConfig, root) -> tuple[TokenStore, StoreBuilder]:
    store = open_token_store(cfg, TOK, root)
    builder = StoreBuilder(store, TOK, cfg.shuffle_seed, cfg.shuffle, cpus_free=0).start()
    builder.join(300)
    return TokenStore(store.path), builder


def test_ray_data_build_matches_a_local_build_and_is_never_repeated(ray_head, tmp_path):
    cfg = DataConfig(path=str(CORPUS), seq_len=64, chunk_mb=0.4)
    store, builder = _ray_build(cfg, tmp_path / "ray")
    assert builder.error is None and len(builder.pending) == store.num_chunks > 3
    local = build_all(open_token_store(cfg, TOK, tmp_path / "local").path, TOK)
    assert store.counts() == local.counts()
    for c in range(store.num_chunks):
        every = [(c, r) for r in range(store.chunk_rows(c))]
        assert np.array_equal(store.read(every)["input_ids"], local.read(every)["input_ids"])
    again = StoreBuilder(open_token_store(cfg, TOK, tmp_path / "ray"), TOK, 0, True, cpus_free=0)
    assert again.pending == []  # a resubmission finds every chunk built


@pytest.fixture(scope="module")
def uneven_bad_source(tmp_path_factory):
    """Files of very unequal length: 40 good documents, one file of unusable rows (empty,
    whitespace, null, missing text, a number, not JSON), an empty file, one document 30x longer
    than a training sequence, and a document with invalid UTF-8 bytes."""
    tmp = tmp_path_factory.mktemp("uneven")
    d = tmp / "data"
    d.mkdir()
    good = [{"id": f"g{i}", "text": f"Story {i}: the fox met a dog near the river and they played."} for i in range(40)]
    (d / "a_good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    bad = [{"id": "b0", "text": ""}, {"id": "b1", "text": "   "}, {"id": "b2", "text": None}, {"id": "b3"},
           {"id": "b4", "text": 7}]
    (d / "b_bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad) + "not json at all\n")
    (d / "c_empty.jsonl").write_text("")
    (d / "d_long.jsonl").write_text(json.dumps({"id": "long", "text": " ".join(["fox"] * 2000)}) + "\n")
    (d / "e_bytes.jsonl").write_bytes(b'{"id": "utf", "text": "caf\xe9 and \xff bytes"}\n')
    return d, [r["id"] for r in good] + ["long", "utf"]


def test_bad_rows_are_skipped_and_counted_and_a_bad_file_is_named(ray_head, uneven_bad_source, tmp_path):
    """Unusable rows are skipped and counted, invalid UTF-8 is decoded with replacement
    characters, a document longer than seq_len continues over several rows; a file that cannot
    be read stops the build with an error naming it, which a waiting driver raises."""
    d, ids = uneven_bad_source
    store, _ = _ray_build(DataConfig(path=str(d), seq_len=64, id_column="id", shuffle=False), tmp_path)
    assert store.counts()["docs_skipped"] == 6
    rows = store.read([(c, r) for c in range(store.num_chunks) for r in range(store.chunk_rows(c))], True)
    assert [i for cell in rows["doc_ids"] for i in cell.split(",") if i] == ids  # each once, in file order
    assert store.counts()["tokens"] > 2000  # the long document was kept whole
    broken = tmp_path / "broken"
    broken.mkdir()
    with gzip.open(broken / "a.jsonl.gz", "wt") as f:  # a readable gzip file is read whole
        f.write(json.dumps({"text": "zipped fine"}) + "\n")
    (broken / "b.jsonl.gz").write_bytes(b"this is not gzip data")
    store = open_token_store(DataConfig(path=str(broken), seq_len=8, shuffle=False), TOK, tmp_path)
    StoreBuilder(store, TOK, 0, False, cpus_free=0).start()
    with pytest.raises(ValueError, match=r"could not read .*b.jsonl.gz"):
        wait_for_first_batch(store, DataConfig(shuffle=False), 64)
    assert TokenStore(store.path).meta(0)["documents"] == 1


def _audit_ids(summary) -> list[str]:
    return summary["data_audit"]["ids"]


def _expected_ids(store_path, steps: range, global_batch: int, seed: int) -> list[str]:
    return seeded_order_ids(store_path, steps, global_batch, DataConfig(shuffle_seed=seed))


def test_shuffled_order_is_exact_across_epochs_and_a_resume_at_another_world_size(ray_head, tmp_path):
    """The bundled corpus with ids, shuffled, two epochs: 2 dp ranks run steps 1-4, then the
    run resumes on 1 worker for steps 5-8 from the checkpoint (O(1): no consumed row is read).
    The documents trained on are exactly the seeded order's, in order, and no document repeats
    within an epoch."""
    from raytune_llama.trainer.llama_trainer import LlamaTrainer

    texts = list(iter_texts(CORPUS))[:12]
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))

    def run(*extra):
        return LlamaTrainer(load_config(REPO / "examples" / "configs" / "tiny_cpu.yaml", [
            f"model.name_or_path={tmp_path}/model", f"data.path={data}", "data.id_column=id", "data.seq_len=64",
            "data.shuffle_seed=5", "data.chunk_mb=0.001", f"run.storage_path={tmp_path}/runs", "run.name=order",
            "train.global_batch_size=4", "train.max_steps=8", "checkpoint.every_steps=4", "train.log_every=1",
            *extra])).fit()

    first = run("train.stop_after_steps=4", 'parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"')
    second = run("parallel.num_workers=1", 'parallel.layout="dp_shard=1,micro_batch_size=2"')
    assert first["final_step"] == 4 and second["steps"] == [5, 6, 7, 8]
    store = TokenStore(first["token_store"])
    assert store.num_chunks > 3
    order = SampleOrder(store, 4, 5, shuffle=True, window=8)
    per_epoch = order.samples_per_epoch() // 4
    assert per_epoch < 8  # the run goes round the data more than once
    assert _audit_ids(first) + _audit_ids(second) == _expected_ids(store.path, range(8), 4, 5)
    epoch0 = _expected_ids(store.path, range(per_epoch), 4, 5)
    assert len(epoch0) == len(set(epoch0))
    assert epoch0 != _expected_ids(store.path, range(per_epoch, 2 * per_epoch), 4, 5)
