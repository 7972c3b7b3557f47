"""The one-line API: examples/finetune_llama3_70b.py (a plain PyTorch loop plus
`enable_advanced_parallelization()`) under Ray Train on 2 CPU workers, for each layout family,
the layout completed and checked by the real planner on the driver. Every family's losses equal
a single-process run of the same loop on the same global batches."""
import importlib.util
import itertools

import numpy as np
import pytest
import torch

from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration
STEPS, GLOBAL_BATCH, SEQ = 3, 8, 64
LAYOUTS = {
    "planner": None,
    "fsdp": "dp_shard=2,zero_stage=3,micro_batch_size=2",
    "tp": "tp=2,micro_batch_size=4",
    "pp": "pp=2,pp_schedule=1f1b,micro_batch_size=2",
    "deepspeed": "dp_shard=2,zero_stage=2,backend=deepspeed,micro_batch_size=4",
}


def _example():
    spec = importlib.util.spec_from_file_location("finetune_example", REPO / "examples" / "finetune_llama3_70b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _overrides(tmp, name, layout):
    sets = [f"model.name_or_path={tmp}/models/tiny-llama", f"data.path={REPO}/examples/data/tiny_corpus.jsonl",
            f"run.storage_path={tmp}/runs", f"run.name={name}", f"train.max_steps={STEPS}",
            f"train.global_batch_size={GLOBAL_BATCH}", f"data.seq_len={SEQ}", "train.lr=0.003"]
    if layout:
        sets.append(f'parallel.layout="{layout}"')
    return [arg for s in sets for arg in ("--set", s)]


TOKENIZER_PAD_ID = 0  # <pad> of the shipped tiny tokenizer


@pytest.fixture(scope="module")
def reference(ray_head, tmp_path_factory):
    """The same loop in one process, no parallelism: plain HF model, stock AdamW."""
    from transformers import AutoModelForCausalLM

    from raytune_llama.config import DataConfig
    from raytune_llama.engine.model_io import ensure_model
    from raytune_llama.engine.data.order import SampleOrder
    from raytune_llama.engine.data.store import build_all
    from raytune_llama.trainer.data_pipeline import open_token_store

    tmp = tmp_path_factory.mktemp("one_line")
    path = ensure_model(f"{tmp}/models/tiny-llama", "tiny-llama", 0)
    # The run's own store and order (default shuffle, seed 0): the run finds this store built.
    data = DataConfig(path=str(REPO / "examples/data/tiny_corpus.jsonl"), seq_len=SEQ)
    store = build_all(open_token_store(data, path, f"{tmp}/runs/token_store").path, path)
    order = SampleOrder.for_data(store, data, GLOBAL_BATCH)
    model = AutoModelForCausalLM.from_pretrained(path)
    optim = torch.optim.AdamW(model.parameters(), lr=0.003)
    losses = []
    for step in range(STEPS):
        batch = store.read(order.positions(step * GLOBAL_BATCH))
        ids = torch.from_numpy(batch["input_ids"])
        labels = ids.masked_fill(ids == TOKENIZER_PAD_ID, -100)  # the example's mask_pads
        # Document packing (the default): the run gives the example's model the served batch's
        # position ids; plain HF builds the same block-diagonal mask from them, but only with
        # use_cache=False (as the example passes): with a cache it keeps the causal mask.
        loss = model(input_ids=ids, labels=labels, position_ids=torch.from_numpy(batch["position_ids"]),
                     use_cache=False).loss
        loss.backward()
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return tmp, losses


@pytest.mark.parametrize("family", [f if f == "planner" else pytest.param(f, marks=pytest.mark.slow)
                                    for f in LAYOUTS])
def test_one_line_loop_matches_single_process(reference, family):
    tmp, ref = reference
    summary = _example().main(["--tiny", *_overrides(tmp, f"one-line-{family}", LAYOUTS[family])])
    assert summary["steps"] == list(range(1, STEPS + 1))
    diff = np.max(np.abs(np.array(summary["losses"]) - np.array(ref)) / np.array(ref))
    print(f"{family}: layout {summary['layout']}; max rel loss diff vs single process {diff:.2e}")
    assert abs(summary["losses"][0] - ref[0]) / ref[0] < 1e-5
    np.testing.assert_allclose(summary["losses"], ref, rtol=1e-4)


def test_own_dataloader_loop_resumes_exactly_and_exports(ray_head, tmp_path):
    """examples/finetune_own_dataloader.py: the loop's own DataLoader (HF datasets, right
    padding, the whole global batch on every rank), two param groups, a transformers schedule,
    clipping, eval every 3 steps, raytune_llama.save_checkpoint / resume. Stopped after step 3
    and launched again, it continues at step 4 with the losses of an uninterrupted run, and the
    final save_pretrained loads in plain transformers."""
    import json

    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("own_loader", REPO / "examples" / "finetune_own_dataloader.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    common = [arg for s in (f"model.name_or_path={tmp_path}/models/tiny-llama",
                            f"data.path={REPO}/examples/data/tiny_corpus.jsonl", f"run.storage_path={tmp_path}/runs",
                            "train.max_steps=6", "train.global_batch_size=8", "data.seq_len=64",
                            "checkpoint.every_steps=2", "train.warmup_steps=2")
              for arg in ("--set", s)] + ["--tiny", "--eval-every", "3"]
    straight = example.main(common + ["--set", "run.name=straight"])
    np.testing.assert_allclose(straight["losses"], _own_loader_in_one_process(example, tmp_path, steps=6), rtol=1e-4)
    first = example.main(common + ["--set", "run.name=resumed", "--set", "train.stop_after_steps=3"])
    second = example.main(common + ["--set", "run.name=resumed"])
    assert straight["steps"] == [1, 2, 3, 4, 5, 6]
    assert first["steps"] == [1, 2, 3] and second["steps"] == [4, 5, 6]
    np.testing.assert_allclose(first["losses"] + second["losses"], straight["losses"], rtol=1e-5)
    history = [json.loads(line) for line in (tmp_path / "runs" / "resumed" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "eval_loss" in r] == [3, 6]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "resumed" / "export")
    assert exported.num_parameters() > 0


def _own_loader_in_one_process(example, tmp_path, steps: int) -> list[float]:
    """The example's loop without the one line, in this process: plain HF model, the same loader,
    param groups, schedule and clipping over the whole global batch (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    model_dir = tmp_path / "models" / "tiny-llama"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    train_set, _ = example.load_splits(str(REPO / "examples" / "data" / "tiny_corpus.jsonl"), tokenizer, 64)
    named = list(model.named_parameters())
    optim = torch.optim.AdamW([{"params": [p for n, p in named if "norm" not in n], "weight_decay": 0.01},
                               {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}], lr=3e-3)
    scheduler = get_cosine_schedule_with_warmup(optim, 2, steps)
    losses = []
    for batch in itertools.islice(example.loader(train_set, tokenizer, 8, 64, 0), steps):
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=example.labels_of(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        scheduler.step()
        model.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses
