"""Planner accuracy on CPU: run layouts of a tiny Llama in spawned gloo groups, measure median step
time and per-rank peak RSS, compare with estimate() on the `cpu` profile before and after
calibration (the project's calibrate(): in-sample and leave-one-out).

Memory: one fresh group per layout. Time: all layouts of one world size built side by side in one
group and stepped round-robin (the box is shared: load spikes then hit every layout alike).

    TORCH_EXTENSIONS_DIR=.cache/torch_extensions .venv/bin/python bench/planner_accuracy.py \
        [--steps 8] [--only ddp2,tp2] [--records bench/planner_accuracy_records.json]
    .venv/bin/python bench/planner_accuracy.py --from-records [--no-share]   # re-fit only, no measuring

The planner sees each rank as a device of 1 core (`cores_per_device: 1`) sharing the host's cores
(`cores_per_node`: the host's, stored in the records), so 4 ranks on 2 cores run at half speed.

Memory measured = VmHWM - VmRSS at the point just before the model is built (after imports and
process-group init; VmHWM is reset there through /proc/self/clear_refs), max over ranks. The
planner's runtime reserve is zeroed (profile override runtime_reserved_bytes=0) so that both
sides count only what the model/engine allocates. Runs are fp32 (1 thread per rank, no autocast:
the engine gets no mixed_precision), so every record carries `compute_dtype: fp32` and the planner
is asked with it (fp32 masters and AdamW moments, fp32 compute copies and activations); records
written before that field existed are the same fp32 runs and are read as fp32.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 1234
SEQ = 128
GLOBAL_ROWS = 8
VOCAB = 512
HP = dict(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), max_grad_norm=1.0)
MODEL = dict(model_type="llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=688,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=SEQ, tie_word_embeddings=False)
CPU_PROFILE = {"runtime_reserved_bytes": 0}  # measured memory excludes the runtime baseline
# This box's 1-thread fp32 GEMM peak and copy bandwidth as measured with the committed records
# (bench/cpu_calibrated_host.yaml); used with --from-records when a record does not carry its own.
RECORDED_HOST = {"peak_flops": 51488017690.999504, "memory_bw": 14247071834.843763, "host_cores": 2}
COMPUTE_DTYPE = "fp32"  # the engine below runs without mixed_precision: fp32 forward/backward on CPU

# name -> (processes, ParallelPlan kwargs); global batch 8 rows x 128 tokens everywhere.
LAYOUTS: dict[str, tuple[int, dict]] = {
    "ddp2": (2, dict(dp_replicate=2, micro_batch_size=4, grad_accum=1)),
    "ddp2_mbs1": (2, dict(dp_replicate=2, micro_batch_size=1, grad_accum=4)),
    "fsdp2_zero2": (2, dict(dp_shard=2, zero_stage=2, micro_batch_size=2, grad_accum=2)),
    "fsdp2_zero3": (2, dict(dp_shard=2, zero_stage=3, micro_batch_size=2, grad_accum=2)),
    "fsdp2_zero3_full": (2, dict(dp_shard=2, zero_stage=3, recompute="full", micro_batch_size=2, grad_accum=2)),
    "tp2": (2, dict(tp=2, micro_batch_size=4, grad_accum=2)),
    "tp2_sp": (2, dict(tp=2, sequence_parallel=True, micro_batch_size=4, grad_accum=2)),
    "pp2_1f1b": (2, dict(pp=2, pp_schedule="1f1b", micro_batch_size=2, grad_accum=4)),
    "pp2_gpipe": (2, dict(pp=2, pp_schedule="gpipe", micro_batch_size=2, grad_accum=4)),
    "ds_zero2": (2, dict(dp_shard=2, zero_stage=2, backend="deepspeed", micro_batch_size=2, grad_accum=2)),
    "dp2_x_tp2_4proc": (4, dict(dp_replicate=2, tp=2, sequence_parallel=True, micro_batch_size=2, grad_accum=2)),
}


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _release_memory() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def batches(n: int) -> list[dict]:
    """Unpadded random global batches (GLOBAL_ROWS x SEQ)."""
    g = torch.Generator().manual_seed(SEED + 1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (GLOBAL_ROWS, SEQ), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _worker(rank: int, world: int, port: int, plan_kw: dict, steps: int, warmup: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from torch.distributed import pipelining  # noqa: F401  (imported outside the measured window)
    from transformers import LlamaConfig, LlamaForCausalLM

    from raytune_llama.engine.parallel import ParallelEngine
    from raytune_llama.planner.plan import ParallelPlan

    if plan_kw.get("backend") == "deepspeed":
        import deepspeed  # noqa: F401
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    res: dict = {}
    try:
        data = batches(warmup + steps)
        _release_memory()
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        base_kb = _status_kb("VmRSS")
        torch.manual_seed(SEED)
        cfg = {k: v for k, v in MODEL.items() if k != "model_type"}
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).float()
        engine = ParallelEngine(model, ParallelPlan(**plan_kw), device="cpu", **HP)
        del model
        per = GLOBAL_ROWS // engine.dp_size
        lo, hi = engine.dp_rank * per, (engine.dp_rank + 1) * per
        times, losses = [], []
        for i, b in enumerate(data):
            local = {k: v[lo:hi] for k, v in b.items()}
            dist.barrier()
            t0 = time.perf_counter()
            stats = engine.train_step(local)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            losses.append(stats["loss"])
            if i >= warmup:
                times.append(float(dt))
        peak = torch.tensor([(_status_kb("VmHWM") - base_kb) * 1024.0], dtype=torch.float64)
        peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(peaks, peak)
        res = {"times": times, "losses": losses, "peaks": [float(p) for p in peaks], "base_rss": base_kb * 1024}
        engine.close()
    except Exception:
        res = {"error": f"rank {rank}: {traceback.format_exc()}"}
    if rank == 0 or "error" in res:
        with open(f"{out}.{rank}", "w") as f:
            json.dump(res, f)
    if "error" in res:
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()


def _timing_worker(rank: int, world: int, port: int, layouts: list, steps: int, warmup: int, out: str) -> None:
    """All layouts of one world size built side by side in ONE group and stepped round-robin, so
    the shared box's load hits every layout alike; per-step time = max over ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from raytune_llama.engine.parallel import ParallelEngine
    from raytune_llama.planner.plan import ParallelPlan

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    cfg = {k: v for k, v in MODEL.items() if k != "model_type"}
    engines = {}
    for name, plan_kw in layouts:
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).float()
        engines[name] = ParallelEngine(model, ParallelPlan(**plan_kw), device="cpu", **HP)
    times: dict = {n: [] for n in engines}
    names = list(engines)
    for i, b in enumerate(batches(warmup + steps)):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
            eng = engines[name]
            per = GLOBAL_ROWS // eng.dp_size
            local = {k: v[eng.dp_rank * per:(eng.dp_rank + 1) * per] for k, v in b.items()}
            dist.barrier()
            t0 = time.perf_counter()
            eng.train_step(local)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i >= warmup:
                times[name].append(float(dt))
    if rank == 0:
        json.dump(times, open(out, "w"))
    dist.barrier()
    for eng in engines.values():
        eng.close()
    dist.destroy_process_group()


def run_interleaved(world: int, layouts: list, steps: int, warmup: int) -> dict:
    """Per-layout step times from one round-robin group (see _timing_worker)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_timing_worker, args=(world, _free_port(), layouts, steps, warmup, out), nprocs=world, join=True)
        return json.load(open(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(world: int, plan_kw: dict, steps: int, warmup: int) -> dict:
    """One fresh spawned gloo group running one layout; rank 0's result (or the error)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res")
        try:
            mp.spawn(_worker, args=(world, _free_port(), plan_kw, steps, warmup, out), nprocs=world, join=True)
        except Exception as exc:  # noqa: BLE001
            errs = [json.load(open(f"{out}.{r}")).get("error", "") for r in range(world) if os.path.exists(f"{out}.{r}")]
            return {"error": "\n".join(errs) or str(exc)}
        return json.load(open(f"{out}.0"))


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when it is undefined."""
    from raytune_llama.planner.rank_stats import spearman as rank_correlation

    rho = rank_correlation(xs, ys)
    return float("nan") if rho is None else rho


def record(name: str, world: int, plan_kw: dict, step_s: float, peak: float | None) -> dict:
    """A `raytune-llama calibrate` RESULTS.json record for one measured layout."""
    from raytune_llama.planner.plan import ParallelPlan

    return {"name": name, "model": MODEL, "hardware": "cpu", "nodes": 1, "devices_per_node": world,
            "seq_len": SEQ, "global_batch": GLOBAL_ROWS, "layout": ParallelPlan(**plan_kw).to_dict(),
            "measured_step_time_s": step_s, "measured_peak_memory_bytes": peak, "optimizer": "adamw",
            "compute_dtype": COMPUTE_DTYPE}


def _estimate(hw, rec: dict):
    """estimate() of one record with hardware spec `hw`, in the record's precision."""
    from raytune_llama.planner.api import estimate
    from raytune_llama.planner.cluster import ClusterSpec

    return estimate(rec["model"], cluster=ClusterSpec(1, rec["devices_per_node"], hw),
                    workload={"seq_len": rec["seq_len"], "global_batch": rec["global_batch"], "headroom": 0.0,
                              "optimizer": rec.get("optimizer", "adamw"),
                              "compute_dtype": rec.get("compute_dtype", COMPUTE_DTYPE)},
                    layout=rec["layout"])


def predict(hw, rec: dict) -> tuple[float, float]:
    """(step time s, peak bytes) from estimate() with hardware spec `hw`."""
    est = _estimate(hw, rec)
    return est.time.step_time, est.memory.total


def predict_terms(hw, rec: dict) -> dict[str, float]:
    """The additive step-time terms (seconds) of estimate() with hardware spec `hw`."""
    return _estimate(hw, rec).time.terms()


def errors(pred: list[float], meas: list[float]) -> tuple[float, float]:
    """(mean, max) relative error |pred/meas - 1| in %."""
    rel = [abs(p / m - 1) * 100 for p, m in zip(pred, meas)]
    return statistics.fmean(rel), max(rel)


def host_peaks() -> dict:
    """One thread's fp32 GEMM FLOP/s (1024^3, best of 5) and copy bandwidth (64 MiB, best of 5)."""
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x = torch.empty(16 * 2**20)
    y = torch.empty_like(x)
    gemm, copy = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        gemm.append(4 * 2 * 1024**3 / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(4):
            y.copy_(x)
        copy.append(4 * 2 * x.numel() * 4 / (time.perf_counter() - t0))
    return {"peak_flops": max(gemm), "memory_bw": max(copy)}


def evaluate(label: str, recs: list[dict], profile: dict, profile_out: str) -> None:
    """Predictions before / after calibrate() (in-sample and leave-one-out) from base `profile`."""
    from raytune_llama.planner.calibrate import calibrate, write_profile
    from raytune_llama.planner.hardware import load_hardware

    extra = ("name", "min_step_time_s", "step_times_s", "host_cores", "host_peak_flops", "host_memory_bw")
    calib_in = [{k: v for k, v in r.items() if k not in extra} for r in recs]
    base = load_hardware("cpu", profile)
    hw_in, report = calibrate(calib_in, hardware="cpu", profile=profile)
    write_profile(hw_in, report, profile_out)
    loo = []
    for i in range(len(recs)):
        hw_i, _ = calibrate(calib_in[:i] + calib_in[i + 1:], hardware="cpu", profile=profile)
        loo.append(predict(hw_i, recs[i]))
    before = [predict(base, r) for r in recs]
    after = [predict(hw_in, r) for r in recs]
    mt = [r["measured_step_time_s"] for r in recs]
    mm = [r["measured_peak_memory_bytes"] for r in recs]
    mib = 2**20
    print(f"\n=== {label} ===")
    print(f"{'layout':<18} {'p':>1} | {'step ms':>8} {'pred0':>7} {'in-s':>7} {'LOO':>7} | {'mem MiB':>7} "
          f"{'pred0':>7} {'in-s':>7} {'LOO':>7}")
    for r, b, a, lo in zip(recs, before, after, loo):
        print(f"{r['name']:<18} {r['devices_per_node']:>1} | {1e3 * r['measured_step_time_s']:8.1f} {1e3 * b[0]:7.1f} "
              f"{1e3 * a[0]:7.1f} {1e3 * lo[0]:7.1f} | {r['measured_peak_memory_bytes'] / mib:7.1f} {b[1] / mib:7.1f} "
              f"{a[1] / mib:7.1f} {lo[1] / mib:7.1f}")
    print(f"{'predictions':<22} {'step mean%':>10} {'step max%':>9} {'spearman':>8} {'sp 2-proc':>9} "
          f"{'mem mean%':>9} {'mem max%':>8}")
    two = [i for i, r in enumerate(recs) if r["devices_per_node"] == 2]
    for name, pr in (("before calibration", before), ("after, in-sample", after), ("after, leave-one-out", loo)):
        st, sm = errors([p[0] for p in pr], mt)
        me, mx = errors([p[1] for p in pr], mm)
        rho = spearman([p[0] for p in pr], mt)
        rho2 = spearman([pr[i][0] for i in two], [mt[i] for i in two])
        print(f"{name:<22} {st:10.1f} {sm:9.1f} {rho:8.3f} {rho2:9.3f} {me:9.1f} {mx:8.1f}")
    print(f"fitted (in-sample): {report['fitted']} -> {profile_out}")
    for w in report["warnings"]:
        print(f"  WARNING: {w}")
    print("predicted step-time terms after in-sample calibration (ms):")
    for r in recs:
        terms = predict_terms(hw_in, r)
        print(f"  {r['name']:<18} " + " ".join(f"{k}={1e3 * v:.1f}" for k, v in terms.items() if v))


def main() -> None:
    """Measure every layout, then compare predictions before/after calibration."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mem-steps", type=int, default=3, help="steps of each fresh memory run")
    ap.add_argument("--only", default="", help="comma-separated layout names")
    ap.add_argument("--records", default=str(ROOT / "bench" / "planner_accuracy_records.json"))
    ap.add_argument("--from-records", action="store_true", help="skip measuring; reuse --records")
    ap.add_argument("--no-share", action="store_true", help="also evaluate without cores_per_node (ablation)")
    ap.add_argument("--profile-out", default=str(ROOT / "bench" / "cpu_calibrated.yaml"))
    args = ap.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    names = [n for n in LAYOUTS if not args.only or n in args.only.split(",")]
    t_start = time.time()
    recs = []
    if args.from_records:
        recs = [r for r in json.load(open(args.records)) if r["name"] in names]
        for r in recs:  # records from before the field: the same fp32 CPU runs
            r.setdefault("compute_dtype", COMPUTE_DTYPE)
    else:
        mem = {}
        for name in names:  # memory: one fresh group per layout
            world, plan_kw = LAYOUTS[name]
            t0 = time.time()
            res = run_layout(world, plan_kw, args.mem_steps, 1)
            if "error" in res:
                print(f"{name}: FAILED\n{res['error']}", flush=True)
                continue
            mem[name] = res
            print(f"{name:<18} {world}p fresh run: step {1e3 * statistics.median(res['times']):7.1f} ms, peak/rank MiB "
                  f"{[round(p / 2**20, 1) for p in res['peaks']]} loss {res['losses'][-1]:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        host = host_peaks()
        times = {}
        for world in sorted({LAYOUTS[n][0] for n in mem}):  # time: round-robin, one group per world size
            t0 = time.time()
            times.update(run_interleaved(world, [(n, LAYOUTS[n][1]) for n in mem if LAYOUTS[n][0] == world],
                                         args.steps, args.warmup))
            print(f"interleaved timing, {world} processes: {time.time() - t0:.0f} s", flush=True)
        for name in mem:
            world, plan_kw = LAYOUTS[name]
            rec = record(name, world, plan_kw, statistics.median(times[name]), max(mem[name]["peaks"]))
            rec["min_step_time_s"], rec["step_times_s"] = min(times[name]), times[name]
            rec.update(host_cores=os.cpu_count(), host_peak_flops=host["peak_flops"], host_memory_bw=host["memory_bw"])
            recs.append(rec)
        Path(args.records).write_text(json.dumps(recs, indent=1))
    if len(recs) < 2:
        sys.exit("need at least 2 measured layouts to calibrate")
    print(f"\nmodel: {MODEL['hidden_size']}h x {MODEL['num_hidden_layers']}L, vocab {VOCAB}, seq {SEQ}, global batch "
          f"{GLOBAL_ROWS}; fp32, 1 thread/rank, gloo; step = median of {args.steps} (max over ranks)")
    # Ranks run 1 thread each on a host with `host_cores` cores: one device = 1 core
    # (cores_per_device 1), shared by devices_per_node ranks (hardware.shared_view).
    host = {"peak_flops": recs[0].get("host_peak_flops"), "memory_bw": recs[0].get("host_memory_bw")}
    cores = recs[0].get("host_cores")
    if args.from_records and not host["peak_flops"]:
        host = {k: RECORDED_HOST[k] for k in ("peak_flops", "memory_bw")}
        cores = cores or RECORDED_HOST["host_cores"]
    share = {"cores_per_node": cores or os.cpu_count(), "cores_per_device": 1}
    from raytune_llama.planner.hardware import load_hardware
    stock = load_hardware("cpu")
    per_core = {"peak_flops": stock.peak_flops / stock.cores_per_device, "memory_bw": stock.memory_bw / stock.cores_per_device}
    evaluate(f"A: stock cpu profile per core (1 of {share['cores_per_node']:.0f} shared cores per rank)", recs,
             dict(CPU_PROFILE, **share, **per_core), args.profile_out)
    print(f"\nthis host, 1 thread: fp32 GEMM {host['peak_flops'] / 1e9:.0f} GFLOP/s, copy {host['memory_bw'] / 1e9:.1f} GB/s")
    evaluate("B: cpu profile with this host's 1-thread GEMM peak and copy bandwidth", recs,
             dict(CPU_PROFILE, **share, **host), args.profile_out.replace(".yaml", "_host.yaml"))
    if args.no_share:
        evaluate("C: as B, but ranks do not share cores (cores_per_node 0: the old model)", recs,
                 dict(CPU_PROFILE, cores_per_node=0, **host), args.profile_out.replace(".yaml", "_noshare.yaml"))
    print(f"total wall time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
