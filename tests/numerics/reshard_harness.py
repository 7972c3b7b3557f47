"""Resharding harness (README, "Fault tolerance and elasticity": resume in any layout): train K
steps under layout X at world size A, save a checkpoint with the production code
(engine/checkpoint_io.py), then in another spawned group of world size B load it into layout Y,
compare the gathered model + optimizer state with what was saved, and train the remaining steps on
the same global batches.

Jobs run in order inside one spawned gloo group per world size (spawning dominates the cost).
A job is a dict: {"name", "layout" (ParallelPlan kwargs), "save": dir | None, "fmt" (full | sharded | async: sharded, written in the background
while training goes on),
"load": dir | None}. A "save" job trains steps [0, SAVE_AT) and saves; a "load" job loads
and trains steps [SAVE_AT, STEPS)."""
from __future__ import annotations

import datetime
import json
import os
import tempfile
import traceback

import torch

import harness as H

SAVE_AT = 3


def _max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for key in a:
        worst = max(worst, float((a[key].double() - b[key].double()).abs().max()))
    return worst


def _compare_state(saved_model, saved_optim, model, optim) -> dict:
    """Largest absolute differences between the saved state and the loaded one."""
    s_state, l_state = saved_optim["state"], optim["state"]
    moments = lambda st: {f"{k}.{f}": st[k][f] for k in s_state for f in ("exp_avg", "exp_avg_sq")}  # noqa: E731
    return {
        "model_keys_equal": set(saved_model) == set(model), "model": _max_diff(saved_model, model),
        "optim_keys_equal": set(s_state) == set(l_state), "optim": _max_diff(moments(s_state), moments(l_state)),
        "steps": sorted({float(v["step"]) for v in l_state.values()}),
    }


def _export(engine, out_dir: str, rank: int) -> None:
    """Streamed export in small parts (several files) next to the gathered state it must equal."""
    from raytune_llama.engine.export import export_model_streaming
    from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, load_tokenizer
    from raytune_llama.engine.training_state import gather_full_state

    source = out_dir + "-source"
    if rank == 0:
        H.tiny_config().save_pretrained(source)
    torch.distributed.barrier()
    export_model_streaming(engine, source, load_tokenizer(SHIPPED_TOKENIZER), out_dir, max_shard_bytes=400_000)
    model, _ = gather_full_state(engine)
    if rank == 0:
        torch.save(model, out_dir + "-gathered.pt")


def _train(engine, batches) -> list[float]:
    per = H.GLOBAL_ROWS // engine.dp_size
    lo = engine.dp_rank * per
    return [engine.train_step({k: v[lo:lo + per] for k, v in b.items()})["loss"] for b in batches]


def _worker(rank: int, world: int, port: int, jobs: list, out_prefix: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from raytune_llama.engine.checkpoint_io import (
        begin_async_save,
        choose_checkpoint,
        finish_async_save,
        load_engine_checkpoint,
        save_engine_checkpoint,
    )
    from raytune_llama.engine.parallel import ParallelEngine
    from raytune_llama.engine.training_state import gather_full_state
    from raytune_llama.planner.plan import ParallelPlan

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    batches = H.global_batches(H.STEPS)
    results = {}
    for job in jobs:
        name = job["name"]
        try:
            engine = ParallelEngine(H.tiny_model(), ParallelPlan(**job["layout"]), device="cpu", **H.HP)
            if job.get("save") and job["fmt"] == "async":
                # Background write: start it, gather what it must contain, train on (changing
                # every weight and moment), only then finish it.
                losses = _train(engine, batches[:SAVE_AT])
                pending = begin_async_save(engine, job["save"], {"step": SAVE_AT})
                model, optim = gather_full_state(engine)
                _train(engine, batches[SAVE_AT:SAVE_AT + 1])
                finish_async_save(pending)
                if rank == 0:
                    torch.save({"model": model, "optim": optim}, os.path.join(job["save"], "reference_state.pt"))
                results[name] = {"losses": losses}
            elif job.get("save"):
                losses = _train(engine, batches[:SAVE_AT])
                save_engine_checkpoint(engine, job["save"], {"step": SAVE_AT}, job["fmt"])
                model, optim = gather_full_state(engine)  # what a loader must get back
                if rank == 0:
                    torch.save({"model": model, "optim": optim}, os.path.join(job["save"], "reference_state.pt"))
                results[name] = {"losses": losses}
            else:
                chosen, refused = choose_checkpoint([job["load"]])
                assert chosen is not None, refused
                meta = load_engine_checkpoint(engine, chosen)
                model, optim = gather_full_state(engine)
                diff = None
                if rank == 0:
                    saved = torch.load(os.path.join(job["load"], "reference_state.pt"), weights_only=True)
                    diff = _compare_state(saved["model"], saved["optim"], model, optim)
                results[name] = {"losses": _train(engine, batches[SAVE_AT:]), "meta_step": meta["step"],
                                 "diff": diff}
                if job.get("export"):
                    _export(engine, job["export"], rank)
            engine.close()
        except Exception:
            results[name] = {"error": f"rank {rank}: " + traceback.format_exc()}
            with open(f"{out_prefix}{rank}.json", "w") as f:
                json.dump(results, f)
            os._exit(1)
        dist.barrier()
    with open(f"{out_prefix}{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def run_jobs(world: int, jobs: list[dict]) -> dict:
    """Run `jobs` in one spawned group of `world` gloo ranks; rank 0's results (errors of any rank)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".cache", "torch_extensions"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "rank")
        try:
            mp.spawn(_worker, args=(world, H._free_port(), jobs, prefix), nprocs=world, join=True)
        except Exception:
            pass  # the per-rank files say which job failed
        per_rank = [json.load(open(f"{prefix}{r}.json")) if os.path.exists(f"{prefix}{r}.json") else {}
                    for r in range(world)]
    results = {}
    for job in jobs:
        errors = [pr[job["name"]]["error"] for pr in per_rank if "error" in pr.get(job["name"], {})]
        results[job["name"]] = {"error": "\n".join(errors)} if errors else per_rank[0].get(job["name"], {"error": "no result"})
    return results
