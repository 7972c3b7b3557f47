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
