"""Build a small byte-level BPE tokenizer from a JSONL corpus, deterministically, and save
it as an HF fast tokenizer (loadable with AutoTokenizer.from_pretrained). Works offline.

    python -m raytune_llama.engine.tokenizer_build --corpus examples/data/tiny_corpus.jsonl \
        --out raytune_llama/assets/tiny_tokenizer --vocab-size 512
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Iterator

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SHIPPED_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"


def iter_texts(corpus: str | Path, text_column: str = "text") -> Iterator[str]:
    """Texts of a JSONL corpus, in file order."""
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)[text_column]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE on texts and wrap it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def load_tokenizer(name_or_path: str | Path):
    """AutoTokenizer.from_pretrained with a pad token guaranteed (EOS when the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class BackendTokenizer:
    """A tokenizer.json used through the `tokenizers` library directly: the same ids as the
    HF fast tokenizer built from it, without importing transformers (seconds per data
    worker process). Callable like an HF tokenizer for `input_ids`."""

    def __init__(self, tokenizer_json: str | Path, eos_token_id: int, pad_token_id: int):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        """{'input_ids': [[ids of text] for text in texts]}."""
        encodings = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}


def main() -> None:
    """CLI: build and save the tokenizer."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=512)
    args = ap.parse_args()
    tok = build_tokenizer(iter_texts(args.corpus), args.vocab_size)
    tok.save_pretrained(args.out)
    print(f"saved tokenizer with {len(tok)} tokens to {args.out}")


if __name__ == "__main__":
    main()
