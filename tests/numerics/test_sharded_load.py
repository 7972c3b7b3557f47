"""Sharded loading: a meta-device model parallelized over 2 ranks reads only its own slices of
a ~400 MB safetensors checkpoint. Each rank's own peak RSS growth must stay well below the
model size, and the gathered weights must equal the saved ones.
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
import socket

import pytest
import torch

pytestmark = pytest.mark.numerics


def _config():
    from transformers import LlamaConfig

    # ~104M params = ~414 MB in fp32.
    return LlamaConfig(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
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


def _worker(rank, world, port, plan_kwargs, path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors import safe_open

    from raytune_llama.engine.parallel import ParallelEngine
    from raytune_llama.engine.parallel.sharded_load import meta_model
    from raytune_llama.planner.plan import ParallelPlan

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    model = meta_model(_config())
    before = _current_rss_bytes()
    engine = ParallelEngine(model, ParallelPlan(**plan_kwargs), device="cpu", load_from=path)
    grown = _peak_rss_bytes() - before
    # Only now gather everything (this does hold the full model) and compare with the file.
    full, _ = engine.get_state(full=True)
    mismatched = []
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            if key not in full or not torch.equal(full[key], f.get_tensor(key)):
                mismatched.append(key)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"grown": grown, "mismatched": mismatched, "n_keys": len(full)}, fh)
    dist.barrier()
    dist.destroy_process_group()


def _save_checkpoint(rank, path):
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch.multiprocessing as mp
    path = str(tmp_path_factory.mktemp("ckpt") / "model.safetensors")
    mp.spawn(_save_checkpoint, args=(path,), nprocs=1, join=True)
    nbytes = os.path.getsize(path)  # fp32 tensors + a small JSON header
    return path, nbytes


@pytest.mark.parametrize("name,plan", [
    ("fsdp2_zero3", dict(dp_shard=2, zero_stage=3)),
    ("tp2", dict(tp=2)),
])
def test_sharded_load_holds_only_own_shards(checkpoint, tmp_path, name, plan):
    import torch.multiprocessing as mp

    path, nbytes = checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, plan, path, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = json.load(open(tmp_path / f"rank{rank}.json"))
        print(f"\n[sharded-load] {name} rank {rank}: peak RSS grew {res['grown'] / 2**20:.0f} MiB "
              f"for a {nbytes / 2**20:.0f} MiB model ({res['grown'] / nbytes:.2f}x)")
        assert not res["mismatched"], f"gathered weights differ: {res['mismatched'][:5]}"
        # Half the model plus slack for strided (row-parallel) slices touching whole pages.
        assert res["grown"] < 0.75 * nbytes
