"""Gradient clipping in a one-line loop (engine/one_line.py): `clip_grad_norm_(model.parameters(),
1.0)` returns the global pre-clip norm and clips by it, as the single-process loop does, under
pipeline parallel (each rank holds different stages: the stage norms are combined) and under
DeepSpeed (the gradients live in DeepSpeed's partitions: the clipping is handed to its step and
the returned tensor receives the norm at `optim.step()`).

One spawned group of 2 gloo ranks runs the loop for each layout; the reference is the same loop
in this process on the plain HF model. The pipeline loop imports `clip_grad_norm_` by name (as
scripts often do), which only works because torch's `_get_total_norm` is what is patched.
Run: TORCH_EXTENSIONS_DIR=.cache/torch_extensions .venv/bin/python -m pytest tests/numerics/test_one_line_clip.py -q -s
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile
import traceback

import pytest
import torch
from torch.nn.utils import clip_grad_norm_  # bound before the one line patches anything

import harness

pytestmark = pytest.mark.numerics
WORLD, STEPS, LR, MAX_NORM = 2, 4, 3e-3, 1.0
LAYOUTS = {
    "pp": dict(pp=2, pp_schedule="1f1b", micro_batch_size=4, grad_accum=2),
    "deepspeed": dict(dp_shard=2, zero_stage=2, backend="deepspeed", micro_batch_size=4),
}


def _loop(model, rows: slice, by_attribute: bool) -> dict:
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for batch in harness.global_batches(STEPS):
        out = model(input_ids=batch["input_ids"][rows], labels=batch["labels"][rows])
        out.loss.backward()
        clip = torch.nn.utils.clip_grad_norm_ if by_attribute else clip_grad_norm_
        norm = clip(model.parameters(), MAX_NORM)
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        norms.append(float(norm))  # read after the step (DeepSpeed fills it there)
    return {"losses": losses, "norms": norms}


def _worker(rank: int, world: int, port: int, model_dir: str, out_prefix: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import raytune_llama

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    results = {}
    try:
        for name, plan in LAYOUTS.items():
            raytune_llama.enable_advanced_parallelization(plan)
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            dp_rank, dp_size = model.engine.dp_rank, model.engine.dp_size
            per = harness.GLOBAL_ROWS // dp_size
            results[name] = _loop(model, slice(dp_rank * per, (dp_rank + 1) * per), by_attribute=name == "deepspeed")
            raytune_llama.disable_advanced_parallelization()
    except Exception:
        results = {"error": f"rank {rank}: " + traceback.format_exc()}
    with open(f"{out_prefix}{rank}.json", "w") as f:
        json.dump(results, f)
    if "error" in results:
        os._exit(1)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results() -> list[dict]:
    import torch.multiprocessing as mp

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".cache", "torch_extensions"))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        harness.tiny_model().save_pretrained(model_dir, safe_serialization=True)
        prefix = os.path.join(tmp, "rank")
        try:
            mp.spawn(_worker, args=(WORLD, harness._free_port(), model_dir, prefix), nprocs=WORLD, join=True)
        except Exception:
            pass  # the per-rank files say what failed
        per_rank = [json.load(open(f"{prefix}{r}.json")) if os.path.exists(f"{prefix}{r}.json")
                    else {"error": f"rank {r}: no result"} for r in range(WORLD)]
    errors = [r["error"] for r in per_rank if "error" in r]
    assert not errors, "\n".join(errors)
    return per_rank


@pytest.fixture(scope="module")
def reference() -> dict:
    torch.set_num_threads(1)
    return _loop(harness.tiny_model(), slice(None), by_attribute=True)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_clip_grad_norm_in_a_one_line_loop_matches_one_process(results, reference, layout):
    for rank, res in enumerate(results):
        got = res[layout]
        print(f"\n[clip] {layout} rank {rank}: norms {got['norms']} (reference {reference['norms']})")
        assert reference["norms"][0] > MAX_NORM  # the clipping is exercised
        assert got["norms"] == pytest.approx(reference["norms"], rel=1e-5)
        assert got["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-5)
        assert got["losses"] == pytest.approx(reference["losses"], rel=1e-4)
