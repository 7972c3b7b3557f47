"""CPU rehearsal of the shipped Llama 3 70B run (examples/configs/llama3_70b_mi250.yaml) end to
end: the same config and the same hub id, `meta-llama/Meta-Llama-3-70B`, found offline in an HF
cache laid out as `hf download` leaves it, but holding a tiny bf16 Llama; 2 CPU workers
instead of 64 GCDs, bf16 compute over fp32 masters as on the MI250s, the config's sequence
length, sharded checkpoints and the export. What it proves: the driver resolves the hub id,
plans on the cluster it has, the workers build the model sharded from the snapshot in fp32,
train, checkpoint and export in the checkpoint's dtype (bf16).

The config's dataset (`tatsu-lab/alpaca`, reader hf, format instruction) is replaced by a local Parquet file with
Alpaca's columns: the datasets library reads a hub dataset offline only from its own
processed-dataset cache, which cannot be laid out by hand the way the model cache can."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytune_llama.config import load_config
from raytune_llama.trainer.llama_trainer import LlamaTrainer
from tests.hf_cache_layout import write_hub_model
from tests.integration.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]
HUB_ID = "meta-llama/Meta-Llama-3-70B"
STEPS = 4


def _alpaca_like(path):
    """Alpaca's columns (instruction, input, output, text) built from the shipped corpus."""
    docs = [json.loads(line)["text"] for line in (REPO / "examples" / "data" / "tiny_corpus.jsonl").open()]
    rows = {"instruction": [], "input": [], "output": [], "text": []}
    for i in range(0, len(docs) - 1, 2):
        instruction, output = "Continue the story.", docs[i + 1]
        rows["instruction"].append(instruction)
        rows["input"].append(docs[i][:80] if i % 4 else "")
        rows["output"].append(output)
        rows["text"].append("Below is an instruction that describes a task. Write a response that appropriately "
                            f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}")
    pq.write_table(pa.table(rows), path)


# The planner's choice for 2 CPU workers, and tensor + sequence parallel (with loss-parallel),
# the model-parallel half of the planner's 70B layout on 8 x 8 MI250 GCDs.
LAYOUTS = [None, "tp=2,sequence_parallel=true"]


@pytest.fixture(scope="module", params=LAYOUTS, ids=["planner", "tp2_sp"])
def rehearsal(ray_head, tmp_path_factory, request):
    from raytune_llama.presets import preset_config

    tmp = tmp_path_factory.mktemp("rehearsal")
    write_hub_model(tmp / "hf", HUB_ID, preset_config("tiny-llama"))
    _alpaca_like(tmp / "alpaca.parquet")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HOME", str(tmp / "hf"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.delenv("HF_HUB_CACHE", raising=False)
    mp.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    try:
        cfg = load_config(REPO / "examples" / "configs" / "llama3_70b_mi250.yaml", [
            f"data.path={tmp}/alpaca.parquet", "data.reader=auto",
            "parallel.num_workers=2", "parallel.use_gpu=false", "parallel.cpus_per_worker=1",
            "parallel.hardware=cpu", f"train.max_steps={STEPS}", "train.global_batch_size=8",
            "train.warmup_steps=1", "checkpoint.every_steps=2", f"run.storage_path={tmp}/runs",
            *([f"parallel.layout={request.param}"] if request.param else []),
        ])
        summary = LlamaTrainer(cfg).fit()
    finally:
        mp.undo()
    return tmp, cfg, summary


def test_the_70b_config_runs_from_the_hf_cache(rehearsal):
    tmp, cfg, s = rehearsal
    assert cfg.model.name_or_path == HUB_ID and cfg.data.seq_len == 1024 and cfg.parallel.mixed_precision == "bf16"
    assert s["steps"] == list(range(1, STEPS + 1)) and s["world_size"] == 2
    assert all(loss == loss and 0 < loss < 20 for loss in s["losses"]), s["losses"]
    assert cfg.data.format == "instruction" and 0 < s["eval_loss"] < 20  # the SFT recipe, validated at the end
    assert s["layout"] == s["layout_history"][-1]  # what the workers ran
    if cfg.parallel.layout:
        assert "tp=2+sp" in s["layout"], s["layout"]


def test_sharded_checkpoint_and_bf16_export(rehearsal):
    from safetensors import safe_open

    tmp, cfg, s = rehearsal
    manifests = sorted((tmp / "runs" / cfg.run.name).glob("checkpoint_*/MANIFEST.json"))
    assert manifests, "no checkpoint written"
    assert json.loads(manifests[-1].read_text()).get("format") == "sharded"  # the 70B config's format
    export = tmp / "runs" / cfg.run.name / "export"
    assert s["export_path"] == str(export)
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    dtypes = set()
    for file in export.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"BF16"}, dtypes
