"""Streamed export pieces: HF file naming and index, dtype of the source config, shard size
limit. (The collective export itself is checked against gathered weights in
tests/numerics/test_resharding.py.)"""
import json

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from raytune_llama.engine.export import _export_dtype, _finish, _ShardWriter
from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, load_tokenizer


def test_bf16_source_exports_bf16_and_unset_keeps_training_dtype():
    assert _export_dtype(LlamaConfig(dtype="bfloat16")) == torch.bfloat16
    assert _export_dtype(LlamaConfig(torch_dtype="bfloat16")) == torch.bfloat16  # older configs
    assert _export_dtype(LlamaConfig()) is None


def test_parts_respect_the_size_limit_and_get_hf_names(tmp_path):
    tmp, final = tmp_path / ".export.tmp", tmp_path / "export"
    tmp.mkdir()
    tensors = {f"model.layers.{i}.w": torch.full((100, 10), float(i)) for i in range(5)}  # 4 kB each
    writers = [_ShardWriter(tmp, "part-r00000", 9000), _ShardWriter(tmp, "part-r00001", 9000)]
    for i, (name, t) in enumerate(tensors.items()):
        writers[i // 3].add(name, t)  # two "pipeline stages"
    for w in writers:
        w.flush()
    files = [f for w in writers for f in w.files]
    assert [len(keys) for _, keys in files] == [2, 1, 2]  # never over 9 kB per part
    _finish(tmp, final, files, LlamaConfig(dtype="bfloat16"), load_tokenizer(SHIPPED_TOKENIZER), torch.bfloat16)
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    loaded = {}
    for name in set(index["weight_map"].values()):
        loaded.update(load_file(final / name))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert (final / "tokenizer.json").is_file() and not tmp.exists()


def test_single_part_is_model_safetensors(tmp_path):
    tmp = tmp_path / ".export.tmp"
    tmp.mkdir()
    w = _ShardWriter(tmp, "part-r00000", 10**9)
    w.add("lm_head.weight", torch.ones(4, 4))
    w.flush()
    _finish(tmp, tmp_path / "export", w.files, LlamaConfig(), load_tokenizer(SHIPPED_TOKENIZER), None)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert not (tmp_path / "export" / "model.safetensors.index.json").exists()
