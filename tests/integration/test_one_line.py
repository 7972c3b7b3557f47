"""The one-line API: examples/finetune_llama3_70b.py (a plain PyTorch loop plus
`enable_advanced_parallelization()`) under Ray Train on 2 CPU workers, for each layout family,
the layout completed and checked by the real planner on the driver. Every family's losses equal
a single-process run of the same loop on the same global batches."""
import importlib.util

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


@pytest.fixture(scope="module")
def reference(ray_head, tmp_path_factory):
    """The same loop in one process, no parallelism: plain HF model, stock AdamW."""
    from transformers import AutoModelForCausalLM

    from raytune_llama.config import DataConfig
    from raytune_llama.engine.model_io import ensure_model
    from raytune_llama.trainer.data_pipeline import build_packed_dataset

    tmp = tmp_path_factory.mktemp("one_line")
    path = ensure_model(f"{tmp}/models/tiny-llama", "tiny-llama", 0)
    ds, _ = build_packed_dataset(DataConfig(path=str(REPO / "examples/data/tiny_corpus.jsonl"), seq_len=SEQ), path)
    rows = ds.take(GLOBAL_BATCH * STEPS)
    model = AutoModelForCausalLM.from_pretrained(path)
    optim = torch.optim.AdamW(model.parameters(), lr=0.003)
    losses = []
    for step in range(STEPS):
        batch = rows[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        ids = torch.tensor(np.stack([r["input_ids"] for r in batch])).long()
        labels = torch.tensor(np.stack([r["labels"] for r in batch])).long()
        loss = model(input_ids=ids, labels=labels).loss
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
