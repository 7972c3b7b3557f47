"""Supervised fine-tuning end to end under Ray, in one run: chat data with the prompts masked,
document packing, a held-out validation loss, LoRA on FSDP, MLflow and TensorBoard tracking,
the best checkpoint kept, and the adapter exported in peft's format (docs/data.md, docs/lora.md,
docs/trackers.md)."""
import json

import pytest
import torch

from raytune_llama.config import load_config
from raytune_llama.trainer.llama_trainer import LlamaTrainer
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration
STEPS = 12


@pytest.fixture(scope="module")
def sft_run(ray_head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    cfg = load_config(REPO / "examples" / "configs" / "tiny_chat.yaml", [
        f"model.name_or_path={tmp}/models/tiny-llama", f"data.path={REPO}/examples/data/tiny_chat.jsonl",
        f"run.storage_path={tmp}/runs", f"train.max_steps={STEPS}", "train.global_batch_size=8",
        "train.warmup_steps=2", "train.eval_every_steps=6", "train.eval_max_batches=3", "train.lr=2e-2",
        "checkpoint.every_steps=4", "checkpoint.keep_last=1", "checkpoint.keep_best=eval_loss",
        'train.lora={"r": 8, "alpha": 16}', 'run.trackers=["mlflow", "tensorboard"]',
        "parallel.layout=dp_shard=2,zero_stage=3",
    ])
    return tmp, cfg, LlamaTrainer(cfg).fit()


def test_chat_sft_with_lora_trains_and_validates(sft_run):
    tmp, cfg, s = sft_run
    assert s["steps"] == list(range(1, STEPS + 1)) and "dp_shard=2" in s["layout"]
    assert s["losses"][-1] < s["losses"][0] - 0.3, s["losses"]  # adapters only: a random base learns slowly
    # validation at every 6 steps, the end, and each checkpoint (keep_best scores them)
    assert s["eval_steps"] == [4, 6, 8, 12] and s["eval_losses"][-1] < s["eval_losses"][0]
    best = json.loads((cfg.run_dir / "best_checkpoint.json").read_text())
    assert best["eval_loss"] == min(s["eval_losses"]) and (cfg.run_dir / best["path"].split("/")[-1]).is_dir()
    kept = sorted(p.name for p in cfg.run_dir.glob("checkpoint_*"))
    assert len(kept) <= 2 and best["path"].split("/")[-1] in kept  # the last one and the best one
    steps = [json.loads(line) for line in (cfg.run_dir / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "eval_loss" in r] == [4, 6, 8, 12]


def test_mlflow_and_tensorboard_hold_every_step_and_evaluation(sft_run):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, cfg, s = sft_run
    client = MlflowClient(f"file://{cfg.run_dir / 'mlruns'}")
    run_id = (cfg.run_dir / "mlflow_run_id").read_text().strip()
    loss = client.get_metric_history(run_id, "loss")
    assert [m.step for m in loss] == list(range(1, STEPS + 1))
    assert [m.value for m in loss] == pytest.approx(s["losses"])
    evals = client.get_metric_history(run_id, "eval_loss")
    assert [m.step for m in evals] == [4, 6, 8, 12] and [m.value for m in evals] == pytest.approx(s["eval_losses"])
    assert client.get_run(run_id).info.status == "FINISHED"
    acc = EventAccumulator(str(cfg.run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval_loss")] == [4, 6, 8, 12]


def test_the_adapter_exports_in_peft_format_and_reproduces_the_run(sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, cfg, s = sft_run
    export = cfg.export_path
    assert (export / "adapter_config.json").is_file() and (export / "adapter_model.safetensors").is_file()
    adapter = json.loads((export / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    base = AutoModelForCausalLM.from_pretrained(str(tmp / "models" / "tiny-llama"))
    tuned = PeftModel.from_pretrained(base, str(export)).eval()
    tok = AutoTokenizer.from_pretrained(str(export))
    assert tok.chat_template == cfg.data.chat_template  # the exported tokenizer chats as trained
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 minus 5?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = tuned.generate(ids, max_new_tokens=8, do_sample=False)
        assert out.shape[1] > ids.shape[1]
        # finetune --merge: the adapter merged into the base, a plain HF model with the same logits
        from raytune_llama.cli.merge_lora_command import merge_run_adapter

        merged = AutoModelForCausalLM.from_pretrained(str(merge_run_adapter(export))).eval()
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-4)
