"""Elastic resharding (README, "Fault tolerance and elasticity": resume in any layout) on the
engine, without Ray: a checkpoint saved at world size A under layout X (either format, any backend)
loads at world size B under layout Y with the model and optimizer state equal to what was saved, and
training continues with exactly the losses of the uninterrupted single-process run (the global batch
is the same 8 rows at every size).

Three spawned groups: world 2 saves, world 1 loads (and saves for 1 -> 2), world 2 loads."""
from __future__ import annotations

import pytest

import harness
import reshard_harness as R

pytestmark = pytest.mark.numerics

FSDP = dict(dp_shard=2, zero_stage=3, micro_batch_size=2, grad_accum=2)
TP = dict(tp=2, micro_batch_size=4, grad_accum=2)
PP = dict(pp=2, pp_schedule="1f1b", micro_batch_size=2, grad_accum=4)
DS3 = dict(dp_shard=2, zero_stage=3, backend="deepspeed", micro_batch_size=2, grad_accum=2)
DS2 = dict(dp_shard=2, zero_stage=2, backend="deepspeed", micro_batch_size=2, grad_accum=2)
SINGLE = dict(micro_batch_size=4, grad_accum=2)

# (name, saved by: world, layout, format) -> loaded by: world, layout
CASES = {
    "fsdp2_to_1": ((2, FSDP, "sharded"), (1, SINGLE)),
    "1_to_fsdp2": ((1, SINGLE, "sharded"), (2, FSDP)),
    "fsdp_to_tp": ((2, FSDP, "sharded"), (2, TP)),
    "tp_to_pp": ((2, TP, "sharded"), (2, PP)),
    "pp_to_fsdp": ((2, PP, "sharded"), (2, FSDP)),
    "pp_to_fsdp_full": ((2, PP, "full"), (2, FSDP)),
    "deepspeed_zero3_to_fsdp": ((2, DS3, "full"), (2, FSDP)),
    "deepspeed_zero3_to_fsdp_sharded": ((2, DS3, "sharded"), (2, FSDP)),
    "fsdp_to_deepspeed_zero2": ((2, FSDP, "sharded"), (2, DS2)),
    "deepspeed_zero3_to_1": ((2, DS3, "full"), (1, SINGLE)),
    "async_fsdp_to_tp": ((2, FSDP, "async"), (2, TP)),
    "async_pp_to_1": ((2, PP, "async"), (1, SINGLE)),
}
# loaded layouts that also export at the end: streamed, per pipeline stage, in several files
EXPORTS = ("tp_to_pp", "deepspeed_zero3_to_fsdp", "fsdp_to_deepspeed_zero2", "fsdp2_to_1")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    saves = {}
    for name, ((world, layout, fmt), _) in CASES.items():
        key = (world, tuple(sorted(layout.items())), fmt)
        if key not in saves:
            saves[key] = {"name": f"save{len(saves)}", "layout": layout, "fmt": fmt, "save": str(root / f"ck{len(saves)}")}
    src = {name: saves[(w, tuple(sorted(l.items())), f)] for name, ((w, l, f), _) in CASES.items()}
    loads = {w: [{"name": n, "layout": CASES[n][1][1], "load": src[n]["save"],
                  "export": str(root / f"export-{n}") if n in EXPORTS else None}
                 for n in CASES if CASES[n][1][0] == w]
             for w in (1, 2)}
    out = R.run_jobs(2, [s for s in saves.values() if s["name"] in {v["name"] for k, v in src.items() if CASES[k][0][0] == 2}])
    one_saves = [s for s in saves.values() if s["name"] in {v["name"] for k, v in src.items() if CASES[k][0][0] == 1}]
    out.update(R.run_jobs(1, one_saves + loads[1]))
    out.update(R.run_jobs(2, loads[2]))
    ref_losses, _ = harness.reference_run()
    return out, src, ref_losses, root


@pytest.mark.parametrize("name", list(CASES))
def test_resume_in_another_layout_matches_uninterrupted_run(results, name):
    out, src, ref, _ = results
    saved, loaded = out[src[name]["name"]], out[name]
    assert "error" not in saved, saved.get("error")
    assert "error" not in loaded, loaded.get("error")
    diff = loaded["diff"]
    print(f"\n{name}: loaded state max |diff| model {diff['model']:.1e} optimizer {diff['optim']:.1e}; "
          f"losses {loaded['losses']} vs {ref[R.SAVE_AT:]}")
    assert diff["model_keys_equal"] and diff["optim_keys_equal"]
    assert diff["model"] <= 1e-6 and diff["optim"] <= 1e-6  # what was saved is what was loaded
    assert diff["steps"] == [float(R.SAVE_AT)] and loaded["meta_step"] == R.SAVE_AT
    assert saved["losses"] == pytest.approx(ref[:R.SAVE_AT], rel=1e-5)
    assert loaded["losses"] == pytest.approx(ref[R.SAVE_AT:], rel=1e-5)


@pytest.mark.parametrize("name", EXPORTS)
def test_streamed_export_equals_gathered_weights_and_loads(results, name):
    """The export never gathers the whole model; what from_pretrained reads back must equal
    the gathered final weights exactly (fp32 model, so no dtype change)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    out, _, _, root = results
    assert "error" not in out[name], out[name].get("error")
    export = root / f"export-{name}"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3  # 400 kB parts: really split
    gathered = torch.load(f"{export}-gathered.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(export)
    loaded = model.state_dict()
    assert set(index["weight_map"]) == set(gathered)
    for key, value in gathered.items():
        assert torch.equal(loaded[key], value), key
    assert (export / "tokenizer.json").is_file() and not list(root.glob(f".export-{name}.tmp*"))
