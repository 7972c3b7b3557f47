"""The shipped tokenizer: offline round trip, and rebuilt deterministically from the corpus."""
import json
from itertools import islice
from pathlib import Path

from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, build_tokenizer, iter_texts, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "examples" / "data" / "tiny_corpus.jsonl"


def test_round_trip_offline():
    tok = load_tokenizer(SHIPPED_TOKENIZER)
    text = 'One rainy morning, Juno said, "Let us look for a silver key." Ünïcode ✓'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(tok) == 512 and max(ids) < 512
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id


def test_build_is_deterministic_and_matches_shipped(tmp_path):
    tok = build_tokenizer(iter_texts(CORPUS), vocab_size=512)
    tok.save_pretrained(tmp_path)
    built = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    shipped = json.loads((SHIPPED_TOKENIZER / "tokenizer.json").read_text())["model"]["vocab"]
    assert built == shipped


def test_tokenizer_compresses_the_corpus():
    tok = load_tokenizer(SHIPPED_TOKENIZER)
    texts = list(islice(iter_texts(CORPUS), 50))
    chars = sum(len(t) for t in texts)
    tokens = sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])
    assert chars / tokens > 2.5  # BPE merges learned from the corpus, not bytes
