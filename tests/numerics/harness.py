"""Numerics harness: run parallel layouts in spawned gloo process groups and a single-process
reference on the same tiny Llama, seed and data, and return per-step losses.

A layout is `(name, ParallelPlan kwargs)` or `(name, ParallelPlan kwargs, options)` with
option `mixed_precision` (ParallelEngine's "bf16" | None). The reference takes it too: with
"bf16" it mirrors the engine's mixed precision (fp32 master weights, forward and loss under
torch.autocast(cpu, bf16), fp32 AdamW); its `model` option overrides the LlamaConfig (e.g. a
vocabulary that tp does not divide).

Every layout is built the way a run builds it (`model_io.build_engine`): the reference's
tiny model is saved as safetensors once, and each rank builds a meta-device model in fp32 and
reads only its own part of the files, so every layout also proves the sharded load.

Several layouts run one after another inside ONE spawned group (spawning + importing torch /
transformers / deepspeed is the dominant cost on a 2-core machine).
Run: TORCH_EXTENSIONS_DIR=.cache/torch_extensions .venv/bin/python -m pytest tests/numerics -q -s
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import time
import traceback

import torch

IGNORE_INDEX = -100
SEED = 1234
STEPS = 5
SEQ_LEN = 32
GLOBAL_ROWS = 8
HP = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), max_grad_norm=1.0)


def tiny_config(**overrides):
    """The 4-layer, 64-wide Llama used by every numerics test (GQA: 4 heads, 2 kv heads)."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaConfig(**{**kwargs, **overrides})


def tiny_model(**overrides):
    """Random-init tiny Llama from a fixed seed (identical in every process)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    return LlamaForCausalLM(tiny_config(**overrides)).float()


def global_batches(steps: int = STEPS, rows: int = GLOBAL_ROWS, seq: int = SEQ_LEN) -> list[dict]:
    """Random tokens; each row ends in a random-length run of -100 labels (padding)."""
    g = torch.Generator().manual_seed(SEED + 1)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 512, (rows, seq), generator=g)
        labels = ids.clone()
        pad = torch.randint(0, seq // 2, (rows,), generator=g)
        for r in range(rows):
            if pad[r]:
                labels[r, seq - int(pad[r]):] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def weight_checksums(state: dict) -> dict[str, float]:
    """Per-tensor sum of |w| (compares final weights across layouts cheaply)."""
    return {k: float(v.detach().double().abs().sum()) for k, v in state.items()}


def reference_run(steps: int = STEPS, mixed_precision: str | None = None,
                  model: dict | None = None) -> tuple[list[float], dict[str, float]]:
    """Plain HF LlamaForCausalLM + torch AdamW + clip_grad_norm_ on the whole global batch:
    (per-step losses, final weight checksums)."""
    trace = reference_trace(steps, mixed_precision, model)
    return trace["losses"], trace["checksums"]


def reference_trace(steps: int = STEPS, mixed_precision: str | None = None, model: dict | None = None) -> dict:
    """reference_run's losses, pre-clip gradient norms and final weight checksums, as a dict."""
    from raytune_llama.engine.parallel.optim import adamw_param_groups

    torch.set_num_threads(1)
    net = tiny_model(**(model or {}))
    opt = torch.optim.AdamW(adamw_param_groups(net.named_parameters(), HP["weight_decay"]),
                            lr=HP["lr"], betas=HP["betas"])
    # bf16: fp32 master weights and optimizer; forward and loss under CPU autocast.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    losses, grad_norms = [], []
    for batch in global_batches(steps):
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = net(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        loss = loss.detach()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), HP["max_grad_norm"])))
        opt.step()
        losses.append(float(loss))
    return {"losses": losses, "grad_norms": grad_norms, "checksums": weight_checksums(net.state_dict()),
            "state": {k: v.detach().clone() for k, v in net.state_dict().items()}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, layouts: list, steps: int, out_prefix: str, model_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # 2 cores shared by up to 8 ranks
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated c10d calls
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # logits are never modified in place
    import torch.distributed as dist

    from raytune_llama.engine.model_io import build_engine
    from raytune_llama.planner.plan import ParallelPlan

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    batches = global_batches(steps)
    results = {}
    for name, plan_dict, *opts in layouts:
        options = opts[0] if opts else {}
        t0 = time.time()
        failed = False
        try:
            # The production path: meta-device model, each rank reading only its part of the
            # tiny model's safetensors (written once by run_layouts), fp32 master weights.
            engine = build_engine(model_dir, ParallelPlan(**plan_dict), device_type="cpu",
                                  mixed_precision=options.get("mixed_precision"), **HP)
            per = GLOBAL_ROWS // engine.dp_size
            lo, hi = engine.dp_rank * per, (engine.dp_rank + 1) * per
            stats = [engine.train_step({k: v[lo:hi] for k, v in b.items()}) for b in batches]
            # Gathered (full) weights under HF names; pipeline ranks contribute their own stages.
            full_state, _ = engine.get_state(full=True)
            engine.close()
            state_file = f"{out_prefix}{rank}.{name}.pt"  # the whole final tensors, compared in full
            torch.save({k: v.detach().cpu() for k, v in full_state.items()}, state_file)
            results[name] = {"losses": [s["loss"] for s in stats], "grad_norms": [s["grad_norm"] for s in stats],
                             "tokens": [s["tokens"] for s in stats], "seconds": time.time() - t0,
                             "checksums": weight_checksums(full_state), "state_file": state_file}
        except Exception:
            results[name] = {"error": f"rank {rank}: " + traceback.format_exc(), "seconds": time.time() - t0}
            failed = True
        with open(f"{out_prefix}{rank}.json", "w") as f:
            json.dump(results, f)
        if failed:
            # Peers may be blocked in a pipeline recv that has no timeout: exit so that
            # mp.spawn tears the whole group down instead of hanging.
            os._exit(1)
    dist.barrier()
    dist.destroy_process_group()


def finish_rank(results: dict, out_prefix: str, rank: int, barrier: bool = True) -> None:
    """The end of a spawned rank: write its results for spawn_ranks; a failed rank exits at once
    (its peers may be blocked in a receive without timeout), the others leave the group."""
    import torch.distributed as dist

    with open(f"{out_prefix}{rank}.json", "w") as f:
        json.dump(results, f)
    if "error" in results:
        os._exit(1)
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def spawn_ranks(worker, world: int, tmp: str, *args) -> list[dict]:
    """Run `worker(rank, world, port, *args, out_prefix)` in a spawned group of `world` ranks; each
    rank writes its result as JSON to f"{out_prefix}{rank}.json" ({"error": ...} when it failed).
    Returns the per-rank results; fails the test with every rank's error if any rank failed."""
    import torch.multiprocessing as mp

    prefix = os.path.join(tmp, "rank")
    try:
        mp.spawn(worker, args=(world, _free_port(), *args, prefix), nprocs=world, join=True)
    except Exception:
        pass  # the per-rank files say what failed
    per_rank = [json.load(open(f"{prefix}{r}.json")) if os.path.exists(f"{prefix}{r}.json")
                else {"error": f"rank {r}: no result"} for r in range(world)]
    errors = [r["error"] for r in per_rank if "error" in r]
    assert not errors, "\n".join(errors)
    return per_rank


def run_layouts(world: int, layouts: list[tuple], steps: int = STEPS) -> dict:
    """Run `layouts` ((name, ParallelPlan kwargs[, options])) in one spawned group of `world` gloo ranks."""
    import torch.multiprocessing as mp

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".cache", "torch_extensions"))
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "rank")
        model_dir = os.path.join(tmp, "model")
        tiny_model().save_pretrained(model_dir, safe_serialization=True)  # what reference_run trains
        try:
            mp.spawn(_worker, args=(world, _free_port(), layouts, steps, prefix, model_dir), nprocs=world, join=True)
            err = None
        except Exception as exc:  # keep the layouts that finished before the failure
            err = f"process group failed: {exc}"
        per_rank = [json.load(open(f"{prefix}{r}.json")) if os.path.exists(f"{prefix}{r}.json") else {}
                    for r in range(world)]
        results = {}
        for name, *_ in layouts:
            errors = [pr[name]["error"] for pr in per_rank if "error" in pr.get(name, {})]
            if errors:
                results[name] = {"error": "\n".join(errors)}
            elif name in per_rank[0]:
                results[name] = per_rank[0][name]
                results[name]["state"] = {}
                for pr in per_rank:  # union of the stage keys held by the pipeline ranks
                    results[name]["checksums"].update(pr[name].get("checksums", {}))
                    results[name]["state"].update(torch.load(pr[name]["state_file"], weights_only=True))
            else:
                results[name] = {"error": err or "no result"}
    return results
