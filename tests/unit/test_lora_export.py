"""LoRA outside the process groups: the peft-format adapter the engine's export writes loads with
`PeftModel.from_pretrained` and gives the trained model's logits; `raytune-llama merge-lora`
streams the base into a merged model equal to peft's `merge_and_unload()`; names, refusals and
the checkpoint's train.lora check. (The distributed export and training: tests/numerics/test_lora.py.)"""
from __future__ import annotations

import json
import types

import pytest
import torch

from raytune_llama.lora_settings import LoraSettings

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)


def _tiny(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)


def _trained_peft(base_dir, dtype=torch.float32):
    """peft on the saved base, with every adapter randomised (as if trained: lora_B non-zero)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from raytune_llama.engine.parallel.lora import peft_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), peft_config(LORA))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture
def base_dir(tmp_path):
    from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, load_tokenizer

    path = tmp_path / "base"
    _tiny().save_pretrained(path)
    load_tokenizer(SHIPPED_TOKENIZER).save_pretrained(path)
    return path


def _write_adapter(model, base_dir, out, parts: int = 2):
    """The engine export's writer, fed the peft model's adapters under the engine's names in
    `parts` parts (pipeline stages write one part each)."""
    from raytune_llama.engine.export import _ShardWriter, write_peft_adapter
    from raytune_llama.engine.parallel.lora import peft_key
    from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, load_tokenizer

    tmp = out.parent / f".{out.name}.tmp-export"
    tmp.mkdir(parents=True)
    adapters = [(n.removeprefix("base_model.model."), p) for n, p in model.named_parameters() if p.requires_grad]
    writers = [_ShardWriter(tmp, f"part-r{i:05d}", 2**62) for i in range(parts)]
    for i, (name, p) in enumerate(adapters):
        writers[i * parts // len(adapters)].add(peft_key(name), p)
    files = []
    for w in writers:
        w.flush()
        files += [name for name, _ in w.files]
    write_peft_adapter(tmp, out, files, LORA, str(base_dir), load_tokenizer(SHIPPED_TOKENIZER))
    return len(adapters)


def _ids():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))


def test_exported_adapter_is_peft_format_and_reproduces_logits(tmp_path, base_dir):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    trained = _trained_peft(base_dir)
    out = tmp_path / "adapter"
    count = _write_adapter(trained, base_dir, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)
    assert sorted(config["target_modules"]) == sorted(LORA.target_modules)
    with safe_open(out / "adapter_model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert len(keys) == count and "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".adapter.tmp*"))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(_ids()).logits, trained(_ids()).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
def test_merge_lora_equals_peft_merge_and_unload(tmp_path, base_dir, max_shard_bytes):
    from transformers import AutoModelForCausalLM

    from raytune_llama.cli.main import main

    trained = _trained_peft(base_dir)
    _write_adapter(trained, base_dir, tmp_path / "adapter")
    argv = ["merge-lora", "--base", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")]
    assert main(argv + (["--max-shard-bytes", str(max_shard_bytes)] if max_shard_bytes else [])) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    reference = trained.merge_and_unload().eval()
    with torch.no_grad():
        diff = float((merged(_ids()).logits - reference(_ids()).logits).abs().max())
    assert diff <= 1e-5
    assert set(merged.state_dict()) == set(reference.state_dict())
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    parts = list((tmp_path / "m").glob("model*.safetensors"))
    if max_shard_bytes is None:
        assert [p.name for p in parts] == ["model.safetensors"]
    else:  # streamed into parts of at most 40 kB (the model is ~170 kB)
        assert len(parts) > 2 and (tmp_path / "m" / "model.safetensors.index.json").is_file()


def test_merge_lora_keeps_a_bf16_base_bf16_with_peft_rounding(tmp_path):
    from transformers import AutoModelForCausalLM

    from raytune_llama.cli.merge_lora_command import merge_lora

    base = tmp_path / "base16"
    _tiny(torch.bfloat16).save_pretrained(base)
    trained = _trained_peft(base, dtype=torch.bfloat16)  # peft keeps the adapters in fp32 (autocast_adapter_dtype)
    _write_adapter(trained, base, tmp_path / "adapter", parts=1)
    merge_lora(str(base), str(tmp_path / "adapter"), str(tmp_path / "m"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    reference = trained.merge_and_unload().state_dict()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    for key, value in reference.items():
        assert merged[key].dtype == torch.bfloat16 and torch.equal(merged[key], value), key


def test_merge_lora_refuses_what_it_cannot_merge(tmp_path, base_dir):
    from raytune_llama.cli.merge_lora_command import adapter_scaling, merge_lora

    assert adapter_scaling({"r": 4, "lora_alpha": 8}, tmp_path) == 2.0
    assert adapter_scaling({"r": 4, "lora_alpha": 8, "use_rslora": True}, tmp_path) == 4.0
    with pytest.raises(ValueError, match="use_dora: True"):
        adapter_scaling({"r": 4, "lora_alpha": 8, "use_dora": True}, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_lora(str(base_dir), str(tmp_path), str(tmp_path / "m"))


def test_names():
    from raytune_llama.engine.parallel.lora import is_adapter, peft_key
    from raytune_llama.engine.parallel.param_names import hf_name

    name = "model.layers.3.mlp.down_proj.lora_B.default.weight"
    assert is_adapter(name) and not is_adapter("model.layers.3.mlp.down_proj.base_layer.weight")
    assert peft_key(name) == "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"
    assert hf_name("model.layers.3.mlp.down_proj.base_layer.weight") == "model.layers.3.mlp.down_proj.weight"


def test_initial_adapters_equal_single_process_peft():
    """peft on the weightless skeleton gives get_peft_model's adapters from the same RNG state,
    without moving the caller's RNG."""
    from peft import get_peft_model

    from raytune_llama.engine.parallel.lora import initial_adapters, peft_config

    model = _tiny()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    init = initial_adapters(model, LORA, torch.float32)
    assert torch.equal(torch.get_rng_state(), state)
    reference = get_peft_model(model, peft_config(LORA))
    want = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if p.requires_grad}
    assert sorted(init) == sorted(want) and all(torch.equal(init[k], v) for k, v in want.items())


def test_refusals_name_train_lora_before_anything_is_built(tmp_path):
    from raytune_llama.engine.model_io import build_engine
    from raytune_llama.engine.parallel import ParallelEngine
    from raytune_llama.engine.parallel.plan_check import check_plan
    from raytune_llama.planner.plan import ParallelPlan

    deepspeed = ParallelPlan(dp_shard=2, zero_stage=3, backend="deepspeed")
    with pytest.raises(ValueError, match=r"train\.lora: .*backend 'deepspeed'.*use a torch layout"):
        ParallelEngine(torch.nn.Linear(2, 2), deepspeed, lora={"r": 8})  # no process group, nothing built
    with pytest.raises(ValueError, match=r"train\.lora: .*backend 'deepspeed'"):
        build_engine(str(tmp_path / "absent"), deepspeed, device_type="cpu", lr=1e-3, weight_decay=0.0,
                     betas=(0.9, 0.95), max_grad_norm=1.0, mixed_precision=None, lora={"r": 8})
    with pytest.raises(ValueError, match=r"train\.lora\.dropout: 0\.05 with tensor parallel \(tp=2\)"):
        check_plan(ParallelPlan(tp=2), lora=LoraSettings(dropout=0.05))
    with pytest.raises(ValueError, match=r"train\.lora\.r"):
        ParallelEngine(torch.nn.Linear(2, 2), ParallelPlan(), lora={"r": 0})
    check_plan(ParallelPlan(tp=2, pp=2, grad_accum=2), lora=LORA)
    check_plan(ParallelPlan(dp_shard=2, zero_stage=3, pp=2, grad_accum=2), lora=LoraSettings(dropout=0.1))


def test_checkpoint_of_other_lora_settings_is_refused(tmp_path):
    from raytune_llama.engine.checkpoint_io import check_lora_matches, lora_meta

    engine = types.SimpleNamespace(lora=LORA)
    (tmp_path / "meta.json").write_text(json.dumps({"step": 3, "lora": lora_meta(engine)}))
    check_lora_matches(types.SimpleNamespace(lora=LoraSettings(r=4, alpha=8.0, dropout=0.1)), tmp_path)
    with pytest.raises(ValueError, match=r"train\.lora: the checkpoint .* was written with train\.lora"):
        check_lora_matches(types.SimpleNamespace(lora=LoraSettings(r=8, alpha=8.0)), tmp_path)
    with pytest.raises(ValueError, match=r"written with train\.lora \{.*'r': 4.*\}, this run has None; resume with"):
        check_lora_matches(types.SimpleNamespace(lora=None), tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"step": 3}))  # a full fine-tuning checkpoint
    with pytest.raises(ValueError, match=r"written with train\.lora None, this run has \{.*'r': 4.*\}; .*another "
                                         r"run\.name"):
        check_lora_matches(engine, tmp_path)
