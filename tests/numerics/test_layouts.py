"""Every parallel layout must reproduce the single-process loss curve of the same tiny Llama.

Reference: plain HF LlamaForCausalLM on the whole global batch, torch AdamW, clip_grad_norm_.
Layouts run in two spawned gloo groups (2 and 4 ranks); each test checks one layout's
per-step losses (step 1 within rtol 1e-5, all steps within rtol 1e-4) and prints the max
difference it saw, then checks the gathered final weights (engine.get_state(full=True)).
Run: TORCH_EXTENSIONS_DIR=.cache/torch_extensions .venv/bin/python -m pytest tests/numerics -q -s
"""
from __future__ import annotations

import pytest

import harness

pytestmark = pytest.mark.numerics

# name -> (world size, ParallelPlan kwargs); global batch = 8 rows of 32 tokens every time.
LAYOUTS: dict[str, tuple[int, dict]] = {
    "ddp2": (2, dict(dp_replicate=2, micro_batch_size=2, grad_accum=2)),
    "fsdp2_zero1": (2, dict(dp_shard=2, zero_stage=1, micro_batch_size=2, grad_accum=2)),
    "fsdp2_zero2": (2, dict(dp_shard=2, zero_stage=2, micro_batch_size=2, grad_accum=2)),
    "fsdp2_zero3": (2, dict(dp_shard=2, zero_stage=3, micro_batch_size=2, grad_accum=2)),
    "tp2": (2, dict(tp=2, micro_batch_size=4, grad_accum=2)),
    "tp2_sp": (2, dict(tp=2, sequence_parallel=True, micro_batch_size=4, grad_accum=2)),
    "pp2_gpipe": (2, dict(pp=2, pp_schedule="gpipe", micro_batch_size=2, grad_accum=4)),
    "pp2_1f1b": (2, dict(pp=2, pp_schedule="1f1b", micro_batch_size=2, grad_accum=4)),
    "pp2_interleaved_v2": (2, dict(pp=2, pp_schedule="interleaved_1f1b", virtual_stages=2,
                                   micro_batch_size=2, grad_accum=4)),
    "fsdp2_zero3_recompute_full": (2, dict(dp_shard=2, zero_stage=3, recompute="full",
                                           micro_batch_size=2, grad_accum=2)),
    "fsdp2_zero3_recompute_selective": (2, dict(dp_shard=2, zero_stage=3, recompute="selective",
                                                micro_batch_size=2, grad_accum=2)),
    "tp2_sp_recompute_selective": (2, dict(tp=2, sequence_parallel=True, recompute="selective",
                                           micro_batch_size=4, grad_accum=2)),
    "deepspeed_zero1": (2, dict(dp_shard=2, zero_stage=1, backend="deepspeed", micro_batch_size=2, grad_accum=2)),
    "deepspeed_zero2": (2, dict(dp_shard=2, zero_stage=2, backend="deepspeed", micro_batch_size=2, grad_accum=2)),
    "deepspeed_zero3": (2, dict(dp_shard=2, zero_stage=3, backend="deepspeed", micro_batch_size=2, grad_accum=2)),
    "deepspeed_zero3_offload_optimizer": (2, dict(dp_shard=2, zero_stage=3, offload=True, backend="deepspeed",
                                                  micro_batch_size=2, grad_accum=2)),
    "fsdp2_dp2_x_tp2": (4, dict(dp_shard=2, zero_stage=3, tp=2, micro_batch_size=2, grad_accum=2)),
    "ddp2_x_tp2": (4, dict(dp_replicate=2, zero_stage=0, tp=2, sequence_parallel=True,
                           micro_batch_size=2, grad_accum=2)),
    "pp2_x_fsdp2": (4, dict(pp=2, dp_shard=2, zero_stage=3, pp_schedule="1f1b", micro_batch_size=1, grad_accum=4)),
    "pp2_x_ddp2": (4, dict(pp=2, dp_replicate=2, pp_schedule="gpipe", micro_batch_size=2, grad_accum=2)),
    "pp2_x_tp2": (4, dict(pp=2, tp=2, pp_schedule="1f1b", micro_batch_size=2, grad_accum=4)),
}

_cache: dict = {}


def _reference() -> tuple[list[float], dict[str, float]]:
    if "ref" not in _cache:
        _cache["ref"] = harness.reference_run()
    return _cache["ref"]


def _group(world: int) -> dict:
    # One spawned process group per world size runs all of its layouts (spawn cost dominates).
    if world not in _cache:
        names = [(n, plan) for n, (w, plan) in LAYOUTS.items() if w == world]
        _cache[world] = harness.run_layouts(world, names)
    return _cache[world]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name):
    world, _ = LAYOUTS[name]
    ref, ref_sums = _reference()
    res = _group(world)[name]
    assert "error" not in res, f"{name} failed:\n{res['error']}"
    got = res["losses"]
    assert len(got) == len(ref)
    rel = [abs(a - b) / abs(b) for a, b in zip(got, ref)]
    print(f"\n[numerics] {name:36s} max|dloss|={max(abs(a - b) for a, b in zip(got, ref)):.3e} "
          f"max rel={max(rel):.3e} step1 rel={rel[0]:.3e} ({res['seconds']:.1f}s)")
    assert rel[0] <= 1e-5, f"step 1 loss {got[0]} vs reference {ref[0]}"
    assert max(rel) <= 1e-4, f"losses {got} vs reference {ref}"
    # engine.get_state(full=True) must give every weight under its HF name, equal to the reference's.
    sums = res["checksums"]
    assert sorted(sums) == sorted(ref_sums), f"state keys differ: {set(sums) ^ set(ref_sums)}"
    worst = max(abs(sums[k] - ref_sums[k]) / ref_sums[k] for k in ref_sums)
    print(f"[numerics] {name:36s} final weights max rel diff (sum|w| per tensor) = {worst:.3e}")
    assert worst <= 1e-4
