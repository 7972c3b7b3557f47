"""LoRA (`train.lora`: peft adapters on a frozen base, docs/lora.md) on every torch layout equals
single-process peft.

Reference: `peft.get_peft_model(tiny Llama, LoraConfig(r=4, lora_alpha=8, lora_dropout=0, all
seven projections))` from a fixed torch seed, torch AdamW over the adapters (the engine's
parameter groups and hyperparameters), clip_grad_norm_, 3 steps on the whole global batch.

Each layout is built as a run builds it (`model_io.build_engine(..., lora=...)`: meta-device
model, each rank reading its part of the safetensors, adapters filled from the whole-model
initial values) in one spawned gloo group of 2 ranks (and one of 4 for the 2-D layouts), and
must give: the same initial adapters, per-step losses within 1e-5 (absolute, fp32), the step-1
gradient norm within rtol 1e-5, final adapters within 1e-5, a frozen base bit-identical to the
model files (in the compute dtype), only adapter parameters in `engine.parameters()` and in the
AdamW state. bf16 layouts (base in bf16, adapters and AdamW in fp32) against the same peft model
with its base cast to bf16 under torch.autocast(cpu, bf16).

Resume: a checkpoint saved after step 2 in one layout (either format) loads into another and
step 3 equals the uninterrupted run; LoRA checkpoints hold the adapters only (size printed next
to a full fine-tuning checkpoint of the same model). Export: the adapter written by
`export_model_streaming` from a TP and a PP engine loads with `peft.PeftModel.from_pretrained`
and gives the reference's logits.
Run: .venv/bin/python -m pytest tests/numerics/test_lora.py -q -s
"""
from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import pytest
import torch

import harness as H

pytestmark = pytest.mark.numerics

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}  # target_modules: the default, all seven projections
LORA_SEED = 4321
STEPS = 3
SAVE_AT = 2

FSDP = dict(dp_shard=2, zero_stage=3, micro_batch_size=2, grad_accum=2)
DDP = dict(dp_replicate=2, micro_batch_size=2, grad_accum=2)
TP = dict(tp=2, micro_batch_size=4, grad_accum=2)
PP = dict(pp=2, pp_schedule="1f1b", micro_batch_size=2, grad_accum=4)
# name -> (world, ParallelPlan kwargs, mixed_precision)
LAYOUTS: dict[str, tuple[int, dict, str | None]] = {
    "fsdp2_zero3": (2, FSDP, None),
    "fsdp2_zero1": (2, dict(FSDP, zero_stage=1), None),
    "fsdp2_zero3_recompute_full": (2, dict(FSDP, recompute="full"), None),
    "ddp2": (2, DDP, None),
    "tp2": (2, TP, None),
    "tp2_sp": (2, dict(TP, sequence_parallel=True), None),
    "pp2_1f1b": (2, PP, None),
    "pp2_interleaved_v2": (2, dict(PP, pp_schedule="interleaved_1f1b", virtual_stages=2), None),
    "fsdp2_zero3_bf16": (2, FSDP, "bf16"),
    "ddp2_bf16": (2, DDP, "bf16"),
    "tp2_sp_bf16": (2, dict(TP, sequence_parallel=True), "bf16"),
    "pp2_1f1b_bf16": (2, PP, "bf16"),
    "fsdp2_x_tp2_sp": (4, dict(dp_shard=2, zero_stage=3, tp=2, sequence_parallel=True, micro_batch_size=2,
                               grad_accum=2), None),
    "pp2_x_fsdp2": (4, dict(pp=2, dp_shard=2, zero_stage=3, pp_schedule="1f1b", micro_batch_size=1,
                            grad_accum=4), None),
    # FSDP2 `replicate` (zero 0 with tp / pp), one with the bf16 base next to fp32 adapters
    "ddp2_x_tp2_sp": (4, dict(dp_replicate=2, tp=2, sequence_parallel=True, micro_batch_size=2, grad_accum=2), None),
    "pp2_x_ddp2_bf16": (4, dict(pp=2, dp_replicate=2, pp_schedule="gpipe", micro_batch_size=2, grad_accum=2),
                        "bf16"),
}
# name -> (saved by layout, format, loaded by layout): all on 2 ranks
RESUMES = {
    "fsdp_to_tp": ("fsdp2_zero3", "sharded", "tp2"),
    "fsdp_to_ddp": ("fsdp2_zero3", "sharded", "ddp2"),
    "pp_to_fsdp_full": ("pp2_1f1b", "full", "fsdp2_zero3"),
    "tp_sp_to_pp": ("tp2_sp", "sharded", "pp2_1f1b"),
}
EXPORTS = ("tp2_sp", "pp2_1f1b")
# bf16: one rounding is 2^-8 relative; the loss is a mean over ~1,500 tokens (tests/numerics/
# test_layouts.py, BF16_LOSS_RTOL, for the reasoning); adapters after 3 steps differ by AdamW's
# +-lr on elements whose gradient sign rounding decided.
BF16_LOSS_RTOL = 5e-4
BF16_ADAPTER_ATOL = 2 * 3 * H.HP["lr"]


def _lora_config():
    from peft import LoraConfig

    from raytune_llama.lora_settings import ALL_LINEAR

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=list(ALL_LINEAR))


def _adapters(named) -> dict[str, torch.Tensor]:
    """peft model parameters -> adapters under the engine's names."""
    return {n.removeprefix("base_model.model."): p.detach().clone() for n, p in named if p.requires_grad}


def reference_model(mixed_precision: str | None = None):
    """Single-process peft on the tiny model, adapters seeded with LORA_SEED; bf16: the base
    (every parameter that is not an adapter) cast to bf16, adapters fp32."""
    from peft import get_peft_model

    model = H.tiny_model()
    torch.manual_seed(LORA_SEED)
    peft_model = get_peft_model(model, _lora_config())
    if mixed_precision == "bf16":
        for _, p in peft_model.named_parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return peft_model


def reference_trace(mixed_precision: str | None = None) -> dict:
    from raytune_llama.engine.parallel.optim import adamw_param_groups

    torch.set_num_threads(1)
    net = reference_model(mixed_precision)
    initial = _adapters(net.named_parameters())
    opt = torch.optim.AdamW(adamw_param_groups(net.named_parameters(), H.HP["weight_decay"]),
                            lr=H.HP["lr"], betas=H.HP["betas"])
    trainable = [p for p in net.parameters() if p.requires_grad]
    losses, grad_norms = [], []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    for batch in H.global_batches(STEPS):
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = net(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, H.HP["max_grad_norm"])))
        opt.step()
        losses.append(float(loss))
    return {"losses": losses, "grad_norms": grad_norms, "initial": initial,
            "final": _adapters(net.named_parameters()), "model": net}


# -- the spawned ranks ---------------------------------------------------------------------
def _build(model_dir: str, plan: dict, mixed_precision: str | None, lora=LORA):
    from raytune_llama.engine.model_io import build_engine
    from raytune_llama.planner.plan import ParallelPlan

    torch.manual_seed(LORA_SEED)
    return build_engine(model_dir, ParallelPlan(**plan), device_type="cpu", mixed_precision=mixed_precision,
                        lora=lora, **H.HP)


def _train(engine, batches) -> list[dict]:
    per = H.GLOBAL_ROWS // engine.dp_size
    lo = engine.dp_rank * per
    return [engine.train_step({k: v[lo:lo + per] for k, v in b.items()}) for b in batches]


def _base_check(engine, model_dir: str, mixed_precision: str | None) -> dict:
    """Every frozen tensor, gathered, against the model files (in the base dtype); the dtypes
    of this rank's parameters and AdamW state (collective: iter_full_tensors)."""
    from safetensors.torch import load_file

    from raytune_llama.engine.parallel.lora import is_adapter
    from raytune_llama.engine.parallel.param_names import hf_name
    from raytune_llama.engine.parallel.state import iter_full_tensors

    files = load_file(os.path.join(model_dir, "model.safetensors"))
    base_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    differ, checked = [], 0
    for name, tensor in iter_full_tensors(engine):
        if not is_adapter(name):
            checked += 1
            if not torch.equal(tensor.cpu(), files[hf_name(name)].to(base_dtype)):
                differ.append(name)
    params = [(n, p) for stage in engine.stages for n, p in stage.named_parameters()]
    optimized = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    return {
        "base_checked": checked, "base_differ": differ,
        "base_dtypes": sorted({str(p.dtype) for n, p in params if not is_adapter(n)}),
        "adapter_dtypes": sorted({str(p.dtype) for n, p in params if is_adapter(n)}),
        "trainable_not_adapter": [n for n, p in engine.named_parameters() if not is_adapter(n)],
        "frozen_adapters": [n for n, p in params if is_adapter(n) and not p.requires_grad],
        "optimized_not_trainable": sum(1 for _, p in params if id(p) in optimized and not p.requires_grad),
        "optimizer_state_params": len(engine.optimizer.state), "trainable_params": len(engine.parameters()),
        "optimizer_state_dtypes": sorted({str(v.dtype) for s in engine.optimizer.state.values()
                                          for k, v in s.items() if k != "step"}),
    }


def _job(job: dict, rank: int, model_dir: str, out_prefix: str) -> dict:
    from raytune_llama.engine.checkpoint_io import choose_checkpoint, load_engine_checkpoint, save_engine_checkpoint
    from raytune_llama.engine.export import export_model_streaming
    from raytune_llama.engine.parallel.state import iter_full_tensors

    batches = H.global_batches(STEPS)
    name, plan, mp = job["name"], job["plan"], job.get("mixed_precision")
    engine = _build(model_dir, plan, mp, lora=job.get("lora", LORA))
    result: dict = {}
    if job.get("load"):
        chosen, refused = choose_checkpoint([job["load"]])
        assert chosen is not None, refused
        load_engine_checkpoint(engine, chosen)
        stats = _train(engine, batches[SAVE_AT:])
    else:
        # (not get_state: DCP initialises an empty AdamW state with a zero-lr step, counting a step)
        initial = {n: t.cpu() for n, t in iter_full_tensors(engine, trainable_only=True)}
        torch.save(initial, f"{out_prefix}{rank}.{name}.initial.pt")
        stats = _train(engine, batches[:SAVE_AT] if job.get("save") else batches)
    result.update(losses=[s["loss"] for s in stats], grad_norms=[s["grad_norm"] for s in stats])
    if job.get("save"):
        save_engine_checkpoint(engine, job["save"], {"step": SAVE_AT}, job["fmt"])
    final, _ = engine.get_state(full=True)  # the adapters only (pipeline: this rank's stages)
    torch.save(final, f"{out_prefix}{rank}.{name}.final.pt")
    if job.get("lora", LORA) is not None:
        result.update(_base_check(engine, model_dir, mp))
    if job.get("export"):
        export_model_streaming(engine, model_dir, None, job["export"])
    engine.close()
    return result


def _worker(rank: int, world: int, port: int, jobs: list, model_dir: str, out_prefix: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    results = {}
    for job in jobs:
        t0 = time.time()
        try:
            results[job["name"]] = {**_job(job, rank, model_dir, out_prefix), "seconds": time.time() - t0}
        except Exception:
            results[job["name"]] = {"error": f"rank {rank}: " + traceback.format_exc()}
            with open(f"{out_prefix}{rank}.json", "w") as f:
                json.dump(results, f)
            os._exit(1)  # peers may wait in a pipeline recv without timeout
        dist.barrier()
    with open(f"{out_prefix}{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _run_group(world: int, jobs: list[dict], model_dir: str, tmp: str) -> dict:
    """Rank results merged over the ranks: losses from rank 0, per-rank checks listed, the
    gathered adapters (initial, final) merged over pipeline ranks."""
    os.makedirs(tmp, exist_ok=True)
    per_rank = H.spawn_ranks(_worker, world, tmp, jobs, model_dir)
    prefix = os.path.join(tmp, "rank")
    out = {}
    for job in jobs:
        name = job["name"]
        res = dict(per_rank[0][name])
        res["ranks"] = [pr[name] for pr in per_rank]
        for kind in ("initial", "final"):
            merged = {}
            for r in range(world):
                path = f"{prefix}{r}.{name}.{kind}.pt"
                if os.path.exists(path):
                    merged.update(torch.load(path, weights_only=True))
            res[kind] = merged
        out[name] = res
    return out


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model_dir = str(root / "model")
    H.tiny_model().save_pretrained(model_dir, safe_serialization=True)
    groups: dict[int, list[dict]] = {}
    for name, (world, plan, mp) in LAYOUTS.items():
        job = {"name": name, "plan": plan, "mixed_precision": mp}
        if name in EXPORTS:
            job["export"] = str(root / f"export-{name}")
        groups.setdefault(world, []).append(job)
    saves = {}
    for name, (src, fmt, dst) in RESUMES.items():
        key = (src, fmt)
        if key not in saves:
            saves[key] = {"name": f"save-{src}-{fmt}", "plan": LAYOUTS[src][1], "fmt": fmt,
                          "save": str(root / f"ck-{src}-{fmt}")}
            groups[2].append(saves[key])
        groups[2].append({"name": name, "plan": LAYOUTS[dst][1], "load": saves[key]["save"]})
    # The same model fine-tuned in full (no LoRA), saved the same way: the size to compare with.
    for fmt in ("sharded", "full"):
        groups[2].append({"name": f"full-finetune-{fmt}", "plan": FSDP, "fmt": fmt, "lora": None,
                          "save": str(root / f"ck-full-finetune-{fmt}")})
    out = {}
    for world, jobs in sorted(groups.items()):
        t0 = time.time()
        out.update(_run_group(world, jobs, model_dir, str(root / f"group{world}")))
        print(f"\n[lora] {world}-rank group: {len(jobs)} jobs in {time.time() - t0:.1f}s")
    return out, root, model_dir


_refs: dict = {}


def _reference(mixed_precision: str | None = None) -> dict:
    if mixed_precision not in _refs:
        _refs[mixed_precision] = reference_trace(mixed_precision)
    return _refs[mixed_precision]


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), f"adapter keys differ: {sorted(set(a) ^ set(b))[:4]}"
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


def _check_rank_facts(name: str, res: dict, mixed_precision: str | None) -> None:
    for rank in res["ranks"]:
        assert rank["base_checked"] > 0 and not rank["base_differ"], f"{name}: base changed: {rank['base_differ']}"
        assert rank["base_dtypes"] == ["torch.bfloat16" if mixed_precision == "bf16" else "torch.float32"]
        assert rank["adapter_dtypes"] == ["torch.float32"] and rank["optimizer_state_dtypes"] == ["torch.float32"]
        assert not rank["trainable_not_adapter"] and not rank["frozen_adapters"]
        assert rank["optimized_not_trainable"] == 0
        assert rank["optimizer_state_params"] == rank["trainable_params"] > 0


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lora_layout_matches_single_process_peft(runs, name):
    out, _, _ = runs
    _, _, mp = LAYOUTS[name]
    res, ref = out[name], _reference(mp)
    assert "error" not in res, res.get("error")
    init_diff = _max_diff(res["initial"], ref["initial"])
    final_diff = _max_diff(res["final"], ref["final"])
    dloss = [abs(a - b) for a, b in zip(res["losses"], ref["losses"])]
    gn_rel = abs(res["grad_norms"][0] - ref["grad_norms"][0]) / ref["grad_norms"][0]
    print(f"\n[lora] {name:28s} max|dloss| {max(dloss):.2e} step1 grad-norm rel {gn_rel:.2e} "
          f"initial adapters {init_diff:.1e} final adapters max|d| {final_diff:.2e} ({res['seconds']:.1f}s)")
    assert init_diff == 0.0, "initial adapters differ from single-process peft's"
    _check_rank_facts(name, res, mp)
    if mp == "bf16":
        assert max(d / abs(b) for d, b in zip(dloss, ref["losses"])) <= BF16_LOSS_RTOL, (res["losses"], ref["losses"])
        assert final_diff <= BF16_ADAPTER_ATOL
        return
    assert max(dloss) <= 1e-5, (res["losses"], ref["losses"])
    assert gn_rel <= 1e-5, (res["grad_norms"], ref["grad_norms"])
    assert final_diff <= 1e-5


@pytest.mark.parametrize("name", list(RESUMES))
def test_lora_resume_in_another_layout_matches_uninterrupted_run(runs, name):
    out, _, _ = runs
    src, fmt, _ = RESUMES[name]
    saved, loaded, ref = out[f"save-{src}-{fmt}"], out[name], _reference()
    assert "error" not in saved and "error" not in loaded, saved.get("error") or loaded.get("error")
    print(f"\n[lora] resume {name:18s} losses {saved['losses']} + {loaded['losses']} vs {ref['losses']}")
    assert saved["losses"] == pytest.approx(ref["losses"][:SAVE_AT], abs=1e-5)
    assert loaded["losses"] == pytest.approx(ref["losses"][SAVE_AT:], abs=1e-5)
    assert _max_diff(loaded["final"], ref["final"]) <= 1e-5
    _check_rank_facts(name, loaded, None)


def _saved_tensors(directory, fmt: str) -> dict[str, int]:
    """Every tensor a checkpoint holds -> its bytes (DCP metadata for sharded, the .pt files for full)."""
    if fmt == "sharded":
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        return {k: m.size.numel() * m.properties.dtype.itemsize for k, m in meta.items()
                if isinstance(m, TensorStorageMetadata)}
    model = torch.load(directory / "model.pt", weights_only=True)
    optim = torch.load(directory / "optimizer.pt", weights_only=True)
    out = {f"model.{k}": v.numel() * v.element_size() for k, v in model.items()}
    for fqn, fields in optim["state"].items():
        out.update({f"optim.state.{fqn}.{f}": v.numel() * v.element_size() for f, v in fields.items()})
    return out


@pytest.mark.parametrize("fmt", ["sharded", "full"])
def test_lora_checkpoint_holds_adapters_only(runs, fmt):
    """Adapters, their AdamW moments (and step counts), nothing of the base: tensor bytes are
    12 per adapter value (fp32 weight + 2 moments). The files carry more: DCP writes every
    flattened optimizer entry (~15 per parameter) as its own pickle of ~1.4 kB, which for this
    4-layer model outweighs the tensors (at 70B it is ~25 MB next to ~2.5 GB)."""
    from raytune_llama.engine.parallel.lora import is_adapter

    out, root, _ = runs
    src = "fsdp2_zero3" if fmt == "sharded" else "pp2_1f1b"
    lora_dir, full_dir = root / f"ck-{src}-{fmt}", root / f"ck-full-finetune-{fmt}"
    lora, full = _saved_tensors(lora_dir, fmt), _saved_tensors(full_dir, fmt)
    adapters = sum(t.numel() for t in _reference()["initial"].values())
    print(f"\n[lora] {fmt} checkpoint: LoRA {_dir_bytes(lora_dir) / 1024:.0f} KiB on disk, "
          f"{sum(lora.values()) / 1024:.0f} KiB of tensors ({adapters} adapter values); full fine-tuning "
          f"{_dir_bytes(full_dir) / 1024:.0f} KiB on disk, {sum(full.values()) / 1024:.0f} KiB of tensors")
    assert json.loads((lora_dir / "meta.json").read_text())["lora"]["r"] == LORA["r"]
    assert all(is_adapter(k) for k in lora), [k for k in lora if not is_adapter(k)][:3]
    assert sum(v for k, v in lora.items() if not k.endswith(".step")) == 12 * adapters
    assert _dir_bytes(lora_dir) < 0.5 * _dir_bytes(full_dir)


@pytest.mark.parametrize("name", EXPORTS)
def test_exported_adapter_loads_in_peft_with_the_trained_logits(runs, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, root, model_dir = runs
    assert "error" not in out[name], out[name].get("error")
    export = root / f"export-{name}"
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == model_dir and config["r"] == LORA["r"]
    assert config["lora_alpha"] == LORA["alpha"] and config["peft_type"] == "LORA"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), export).eval()
    ids = H.global_batches(1)[0]["input_ids"][:2]
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        want = _reference()["model"].eval()(input_ids=ids).logits
    diff = float((got - want).abs().max())
    print(f"\n[lora] export {name}: max |logit diff| vs the trained reference {diff:.2e}")
    assert diff <= 1e-4
    from safetensors import safe_open

    with safe_open(export / "adapter_model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == len(_reference()["initial"])

