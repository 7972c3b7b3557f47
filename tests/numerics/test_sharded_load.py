"""Sharded loading from the HF cache, for every backend: a ~102M-parameter bf16 model laid out
in a temporary HF_HOME exactly as `hf download` leaves it (blobs, snapshot symlinks,
refs/main, sharded safetensors + model.safetensors.index.json) is found offline by its hub
id and laid out through the real `model_io.build_engine` path. Each rank's own peak RSS
growth must stay well below the model size, and the gathered weights must equal the file's.

"Model size" here is what training holds: parameters x 4 bytes (fp32 master weights, which
every layout builds from the bf16 checkpoint); the checkpoint on disk is half that.
Peak RSS: resource.getrusage's ru_maxrss is carried over from the parent across fork+exec
(Linux keeps the larger of the two), so it is checked together with VmHWM from
/proc/self/status, the high-water mark of this process's own address space; the checkpoint
is written by a separate process so the pytest parent never holds the model.
Run: .venv/bin/python -m pytest tests/numerics/test_sharded_load.py -q -s
"""
from __future__ import annotations

import datetime
import json
import os
import resource
import pytest
import torch

import harness

pytestmark = pytest.mark.numerics
HUB_ID = "meta-llama/Meta-Llama-3-70B"


def _config():
    from transformers import LlamaConfig

    # ~102M params: 408 MB as fp32 masters, 204 MB as the bf16 checkpoint. Like a real Llama,
    # most of it is in the decoder layers (the embedding is 4% here, 1.5% in Llama 3 70B): the
    # largest single tensor, which a rank may briefly hold whole, stays small next to a shard.
    return LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                       tie_word_embeddings=False, attn_implementation="sdpa")


def _peak_rss_bytes() -> int:
    """Own peak RSS: getrusage, unless it still shows the inherited parent peak (then VmHWM)."""
    rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return min(rusage, hwm)


def _current_rss_bytes() -> int:
    # Baseline = resident NOW (the import-time peak may exceed it; peak-minus-peak would hide growth).
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank, world, port, plan_kwargs, hf_home, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HOME=hf_home, HF_HUB_OFFLINE="1",
                      TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", ".cache/torch_extensions"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # HF_HOME alone names the cache
        os.environ.pop(name, None)
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors import safe_open

    from raytune_llama.engine.hf_cache import resolve_pretrained
    from raytune_llama.engine.model_io import build_engine
    from raytune_llama.engine.parallel.sharded_load import safetensors_index
    from raytune_llama.planner.plan import ParallelPlan

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))
    plan = ParallelPlan(**plan_kwargs)
    # Code the load imports on first use (transformers' Llama modelling, DeepSpeed) is not
    # model memory: import it before the baseline.
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401
    if plan.backend == "deepspeed":
        import deepspeed  # noqa: F401
    before = _current_rss_bytes()
    if plan.backend == "deepspeed":
        full, dtypes, grown = _deepspeed_stage(plan, before)
    else:
        engine = build_engine(HUB_ID, plan, device_type="cpu", lr=1e-5, weight_decay=0.0,
                              betas=(0.9, 0.95), max_grad_norm=1.0, mixed_precision=None)
        grown = _peak_rss_bytes() - before
        dtypes = sorted({str(p.dtype) for p in engine.parameters()})
        # Only now gather everything (this does hold the full model) and compare with the files.
        full, _ = engine.get_state(full=True)
        engine.close()
    index = safetensors_index(str(resolve_pretrained(HUB_ID)))
    mismatched = []
    for key, file in index.items():
        with safe_open(file, framework="pt") as f:
            if key not in full or not torch.equal(full[key], f.get_tensor(key).float()):
                mismatched.append(key)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"grown": grown, "mismatched": mismatched, "n_keys": len(full), "dtypes": dtypes}, fh)
    dist.barrier()
    dist.destroy_process_group()


def _deepspeed_stage(plan, before: int):
    """DeepSpeed ZeRO-3's construction and load, exactly as build_engine runs it
    (deepspeed_backend.build_stage_for_deepspeed), measured before deepspeed.initialize: the
    buffers DeepSpeed then adds (an fp32 master clone of the partitions, a flat gradient
    partition, the moments) live on the accelerator on a GPU node, and are the optimizer's
    state, not a copy of the model, so only this part says whether a rank held the model."""
    import deepspeed
    from transformers import AutoConfig

    from raytune_llama.engine.hf_cache import resolve_pretrained
    from raytune_llama.engine.parallel.deepspeed_backend import build_stage_for_deepspeed
    from raytune_llama.engine.parallel.sharded_load import meta_model

    path = str(resolve_pretrained(HUB_ID))
    stage = build_stage_for_deepspeed(meta_model(AutoConfig.from_pretrained(path)), plan, path,
                                      torch.device("cpu"), 1.0, None)
    grown = _peak_rss_bytes() - before
    dtypes = sorted({str(p.ds_tensor.dtype) for p in stage.parameters()})
    full = {}
    for name, param in stage.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            full[name] = param.detach().clone()
    return full, dtypes, grown


def _save_checkpoint(rank, hf_home):
    from tests.hf_cache_layout import write_hub_model

    write_hub_model(hf_home, HUB_ID, _config(), max_shard_size="100MB")


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    import torch.multiprocessing as mp

    home = str(tmp_path_factory.mktemp("hf"))
    mp.spawn(_save_checkpoint, args=(home,), nprocs=1, join=True)
    return home


@pytest.mark.parametrize("name,world,plan", [
    ("fsdp2_zero3", 2, dict(dp_shard=2, zero_stage=3, micro_batch_size=1)),
    ("tp2", 2, dict(tp=2)),
    # Measured up to deepspeed.initialize (see _deepspeed_stage).
    ("deepspeed_zero3", 4, dict(dp_shard=4, zero_stage=3, backend="deepspeed", micro_batch_size=1)),
])
def test_sharded_load_holds_only_own_shards(hf_home, tmp_path, name, world, plan, monkeypatch):
    import torch.multiprocessing as mp

    # glibc keeps freed heap memory of mid-sized blocks (and raises its mmap threshold as
    # blocks are freed), so transient per-tensor buffers would pile up as RSS that holds no
    # tensor; with a fixed threshold every large block is its own mapping, returned on free,
    # and the peak shows what the rank really held at once.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))

    from tests.hf_cache_layout import REVISION

    snapshot = os.path.join(hf_home, "hub", "models--" + HUB_ID.replace("/", "--"), "snapshots", REVISION)
    index = json.load(open(os.path.join(snapshot, "model.safetensors.index.json")))
    params = index["metadata"]["total_size"] // 2  # bf16: 2 bytes per parameter
    model_bytes = 4 * params
    mp.spawn(_worker, args=(world, harness._free_port(), plan, hf_home, str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        res = json.load(open(tmp_path / f"rank{rank}.json"))
        print(f"\n[sharded-load] {name} rank {rank}: peak RSS grew {res['grown'] / 2**20:.0f} MiB "
              f"for a {model_bytes / 2**20:.0f} MiB fp32 model ({res['grown'] / model_bytes:.2f}x)")
        assert not res["mismatched"], f"gathered weights differ: {res['mismatched'][:5]}"
        # fp32 compute here, so DeepSpeed's module partitions are fp32 too (its bf16 mode and the
        # fp32 masters under it: tests/numerics/test_master_weights.py).
        assert res["dtypes"] == ["torch.float32"], f"parameters are {res['dtypes']}, not fp32"
        # This rank's 1/world of the model, plus slack for the tensor being read (its bf16 piece
        # and the mmapped pages of strided, row-parallel slices): never the whole model.
        assert res["grown"] < (1 / world + 0.15) * model_bytes
