"""`raytune-llama tune-layout`: run the planner's top-k layouts (and the config's own
`parallel.layout`) for a few steps each on the real cluster, as Ray Tune trials, and measure them.

    report = tune_layout(load_config("cfg.yaml"), top_k=4, steps=8, calibrate=True)
    print(format_report(report))

Each trial is a real run of the config's model and data (trainer/tune_trials.py `fit_in_trial`:
a LlamaTrainer TorchTrainer run inside the trial) with one fixed layout, its own run name
`{run.name}-layout-{i}` under `{run.storage_path}/{run.name}/tune_layout/trials`, started fresh
and deleted once measured. What it measures (docs/planner.md, "Measuring the best layouts"):
the median step time of the steps after a warm-up of 1-2 steps, tokens/s and MFU over the same
steps, the peak memory rank 0 reports, and failures (an out-of-memory error is "oom", any other
"error"; neither stops the search). Written under `{run.storage_path}/{run.name}/tune_layout/`:
records.json (the `raytune-llama calibrate` records of the measured layouts), report.json (the
whole report), measured_layout.json (the fastest layout, for `parallel.layout: measured`) and,
with calibrate, profile.yaml (the profile fitted to these measurements).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from raytune_llama.config import Config, ConfigError, config_from_dict
from raytune_llama.engine.atomic_files import write_json_atomic
from raytune_llama.planner.plan import ParallelPlan
from raytune_llama.planner.rank_stats import ranks, spearman

log = logging.getLogger(__name__)

OK, OOM, ERROR = "ok", "oom", "error"
# Words of an out-of-memory failure, whatever wraps it: torch's allocators (CUDA/HIP "out of
# memory", torch.OutOfMemoryError) and Ray's memory monitor killing a worker on a full host.
OOM_MARKERS = ("out of memory", "outofmemoryerror", "running low on memory", "oom killer", "oom-kill")
TRIAL_KEYS = ("layout", "predicted_step_time_s", "measured_step_time_s", "predicted_memory_bytes",
              "measured_peak_memory_bytes", "status")


# ---------------------------------------------------------------------------------------------
# Pure parts: layout strings, ranks, Spearman, failure classification, steady-state measurement.
# ---------------------------------------------------------------------------------------------

def layout_spec(plan: ParallelPlan) -> str:
    """A `parallel.layout` string naming every field of `plan`, so the run gets exactly this
    layout (ParallelPlan.describe() is for reading, not for parsing)."""
    return ",".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                    for key, value in plan.to_dict().items())


def warmup_steps(steps: int) -> int:
    """Steps left out of the steady state: 2 of 6 or more, 1 of 2-5, none of a single step."""
    return 2 if steps >= 6 else (1 if steps >= 2 else 0)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[Optional[BaseException]] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        # Ray Train v2 keeps the workers' and the controller's errors on its own exceptions
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        todo += [x for x in getattr(e, "worker_failures", {}).values() if isinstance(x, BaseException)] \
            if isinstance(getattr(e, "worker_failures", None), dict) else []
    return seen


def classify_failure(failure: "BaseException | str | None") -> str:
    """"oom" for an out-of-memory failure (torch.OutOfMemoryError anywhere in the exception's
    chain, or "out of memory" in its text, as Ray Train and Ray Tune pass worker errors on as
    text), else "error"."""
    if failure is None:
        return ERROR
    texts = [failure] if isinstance(failure, str) else []
    if isinstance(failure, BaseException):
        for e in _chain(failure):
            if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, ray.exceptions.OutOfMemoryError
                return OOM
            texts.append(f"{type(e).__name__}: {e}")
    low = "\n".join(texts).lower()
    return OOM if any(m in low for m in OOM_MARKERS) else ERROR


def failure_message(failure: "BaseException | str", limit: int = 400) -> str:
    """One line for the table and the JSON: the line naming the out-of-memory error when there
    is one, else the last line of the innermost error that says something."""
    texts = [failure] if isinstance(failure, str) else [str(e) for e in _chain(failure)]
    lines = [ln.strip() for t in texts for ln in str(t).splitlines() if ln.strip()]
    oom = [ln for ln in lines if any(m in ln.lower() for m in OOM_MARKERS)]
    pick = oom[0] if oom else (lines[-1] if lines else type(failure).__name__)
    return pick[:limit]


def steady_state(records: Sequence[dict], warmup: int) -> dict:
    """Measurements of one trial from its step records (RUN_DIR/steps.jsonl: what rank 0
    reports each step, trainer/worker_loop.py): medians over the steps after `warmup`, the
    largest peak memory seen (accelerator allocator; null where the workers report none)."""
    records = sorted(records, key=lambda r: r["step"])
    steady = records[warmup:] or records[-1:]
    if not steady:
        raise ValueError("no step records to measure")

    def median(key: str) -> Optional[float]:
        vals = [float(r[key]) for r in steady if isinstance(r.get(key), (int, float))]
        return statistics.median(vals) if vals else None

    peaks = [int(r["peak_memory_bytes"]) for r in records if isinstance(r.get("peak_memory_bytes"), (int, float))]
    times = [float(r["step_time_s"]) for r in steady if isinstance(r.get("step_time_s"), (int, float))]
    step = statistics.median(times) if times else None
    # Half the range of the measured steps, relative to their median: how far apart two layouts'
    # step times must be before their order means something on this cluster.
    spread = 100 * (max(times) - min(times)) / (2 * step) if step else None
    return {"measured_step_time_s": step, "step_time_spread_pct": spread,
            "measured_tokens_per_s": median("tokens_per_s"),
            "measured_mfu": median("mfu"), "measured_peak_memory_bytes": max(peaks) if peaks else None,
            "steps_measured": [r["step"] for r in steady],
            "step_times_s": [r.get("step_time_s") for r in records]}


def summarize(trials: list[dict]) -> dict:
    """Ranks by prediction and by measurement, the winner (fastest ok trial) and the Spearman
    rank correlation of predicted vs measured step time over the ok trials."""
    pred = [t.get("predicted_step_time_s") for t in trials]
    meas = [t.get("measured_step_time_s") if t.get("status") == OK else None for t in trials]
    for t, rp, rm in zip(trials, ranks(pred), ranks(meas)):
        t["predicted_rank"], t["measured_rank"] = rp, rm
    ok = [t for t in trials if t.get("status") == OK and t.get("measured_step_time_s")]
    winner = min(ok, key=lambda t: (t["measured_step_time_s"], t["index"])) if ok else None
    return {"trials": trials, "winner": winner,
            "spearman": spearman([t["predicted_step_time_s"] for t in ok], [t["measured_step_time_s"] for t in ok])}


def calibration_record(trial: dict, context: dict) -> dict:
    """One `raytune-llama calibrate` record (planner/calibrate.py) of a measured trial."""
    return {**context, "layout": trial["layout_spec"], "measured_step_time_s": trial["measured_step_time_s"],
            "measured_peak_memory_bytes": trial.get("measured_peak_memory_bytes"),
            "measured_tokens_per_s": trial.get("measured_tokens_per_s"), "measured_mfu": trial.get("measured_mfu"),
            "predicted_step_time_s": trial.get("predicted_step_time_s"),
            "predicted_memory_bytes": trial.get("predicted_memory_bytes"), "described": trial["layout"],
            "source": "raytune-llama tune-layout"}


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


def measured_layout_record(winner: dict, context: dict, topology: dict, steps: int) -> dict:
    """What `parallel.layout: measured` reads (trainer/planning.py measured_layout)."""
    return {"layout": winner["layout_spec"], "describe": winner["layout"],
            "measured_step_time_s": winner["measured_step_time_s"],
            "measured_tokens_per_s": winner.get("measured_tokens_per_s"),
            "predicted_step_time_s": winner.get("predicted_step_time_s"), "topology": topology,
            "world_size": context["nodes"] * context["devices_per_node"], "global_batch": context["global_batch"],
            "seq_len": context["seq_len"], "model": context["model"], "steps": steps,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


# ---------------------------------------------------------------------------------------------
# Formatting.
# ---------------------------------------------------------------------------------------------

def _secs(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _bytes(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x / 2**30:.1f} GiB" if x >= 2**30 else f"{x / 2**20:.0f} MiB"


def format_report(report: dict) -> str:
    """The table: layout, rank by prediction and by measurement, predicted vs measured step time
    and memory, tokens/s, MFU, status; then the winner and the rank correlations."""
    rows = [("#", "pred", "meas", "layout", "pred step", "meas step", "spread", "tokens/s", "MFU", "pred mem",
             "meas mem", "status")]
    for t in report["trials"]:
        mfu = t.get("measured_mfu")
        tput = t.get("measured_tokens_per_s")
        rows.append((str(t["index"]), str(t.get("predicted_rank") or "-"), str(t.get("measured_rank") or "-"),
                     t["layout"], _secs(t.get("predicted_step_time_s")), _secs(t.get("measured_step_time_s")),
                     f"±{t['step_time_spread_pct']:.0f}%" if t.get("step_time_spread_pct") is not None else "-",
                     f"{tput:,.0f}" if tput is not None else "-", f"{mfu:.2%}" if mfu is not None else "-",
                     _bytes(t.get("predicted_memory_bytes")), _bytes(t.get("measured_peak_memory_bytes")),
                     t["status"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = {3, 11}
    lines = [f"tune-layout {report.get('run_name', '')}: {report.get('model_name', '')} on "
             f"{report.get('cluster', '')}; {report.get('steps')} steps per layout, step time = median of steps "
             f"{report.get('warmup_steps', 0) + 1}..{report.get('steps')}"]
    for r in rows:
        cells = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines.append("  ".join(cells).rstrip())
    for t in report["trials"]:
        if t["status"] != OK and t.get("error"):
            lines.append(f"  #{t['index']} {t['status']}: {t['error']}")
    w = report.get("winner")
    if w:
        lines.append(f"winner: {w['layout']} ({_secs(w['measured_step_time_s'])}/step measured, "
                     f"{_secs(w['predicted_step_time_s'])} predicted; the planner ranked it #{w['predicted_rank']})")
    else:
        lines.append("winner: none (no layout ran)")
    rho = report.get("spearman")
    n_ok = sum(1 for t in report["trials"] if t["status"] == OK)
    lines.append("Spearman rank correlation, predicted vs measured step time: "
                 + (f"{rho:+.2f}" if rho is not None else "n/a") + f" over {n_ok} measured layout(s)")
    if report.get("calibration"):
        c = report["calibration"]
        rho2 = c.get("spearman_after")
        lines.append("after calibration: " + (f"{rho2:+.2f}" if rho2 is not None else "n/a")
                     + f"; step-time error {c.get('step_time_error_pct_before')}% -> "
                       f"{c.get('step_time_error_pct_after')}%; profile {c.get('profile')}")
    files = report.get("files", {})
    if files:
        lines.append("wrote " + ", ".join(f"{k} {v}" for k, v in files.items() if v))
    if w and files.get("measured_layout"):
        lines.append("run it with: raytune-llama finetune CONFIG.yaml --set parallel.layout=measured")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The search on the cluster.
# ---------------------------------------------------------------------------------------------

def candidates(cfg: Config, model_path: str, topology, top_k: int) -> list[dict]:
    """The planner's top-k layouts (its choice and the best of each runner-up family, as
    `raytune-llama plan` lists them) plus the config's own parallel.layout, each with the
    planner's predictions; a config layout the planner finds infeasible is kept, not run."""
    from raytune_llama.planner.api import estimate, plan
    from raytune_llama.planner.errors import PlanError
    from raytune_llama.trainer.planning import MEASURED, measured_layout, model_spec, run_workload

    spec, cluster, workload = model_spec(model_path), topology.to_dict(), run_workload(cfg)
    out: list[dict] = []
    try:
        result = plan(spec, cluster=cluster, workload=workload)
    except PlanError as exc:
        raise ConfigError([f"parallel: no layout for this run on {topology.describe()}: {exc}"]) from exc
    for cand in [result.best, *result.alternatives][:max(1, top_k)]:
        out.append({"plan": cand.plan, "source": "planner", "predicted_step_time_s": cand.time.step_time,
                    "predicted_memory_bytes": int(cand.memory.total), "predicted_tokens_per_s": cand.time.tokens_per_s,
                    "predicted_mfu": cand.time.mfu})
    own = cfg.parallel.layout
    if isinstance(own, str) and own.strip() == MEASURED:
        try:
            own = measured_layout(cfg, topology)
        except ConfigError:
            own = None  # nothing measured yet: this search is what measures it
    if own:
        try:
            est = estimate(spec, cluster=cluster, workload=workload, layout=own)
        except PlanError as exc:
            raise ConfigError([f"parallel.layout: {own!r}: {exc}"]) from exc
        same = next((c for c in out if est.plan is not None and c["plan"] == est.plan), None)
        if same is not None:
            same["source"] = "planner, parallel.layout"
        else:
            entry = {"plan": est.plan, "source": "parallel.layout",
                     "predicted_step_time_s": est.time.step_time if est.time else None,
                     "predicted_memory_bytes": int(est.memory.total) if est.memory else None,
                     "predicted_tokens_per_s": est.time.tokens_per_s if est.time else None,
                     "predicted_mfu": est.time.mfu if est.time else None}
            if not est.feasible:
                entry["not_run"] = "the planner finds it infeasible: " + "; ".join(est.reasons)
            out.append(entry)
    return out


def trial_config(cfg: Config, layout: str, name: str, steps: int, trials_dir: Path, store_dir: str) -> dict:
    """The config of one trial (a dict: it travels to the trial): the run's model, data and
    cluster with `layout`, a fresh run of `steps` steps under trials_dir, nothing that costs
    time: no checkpoint at all (checkpoint.save_at_end false: at 70B one would be ~850 GB per
    trial), no export, evaluation, trackers or restarts; every step reported."""
    d = cfg.to_dict()
    d["parallel"].update(layout=layout, min_workers=None)
    d["train"].update(max_steps=max(int(cfg.train.max_steps), steps + 1),  # > stop: no export at the end
                      stop_after_steps=steps, log_every=1, eval_every_steps=0, eval_max_batches=1)
    # eval_fraction stays: it is part of the training store's identity (the same rows as the run).
    d["data"].update(store_dir=store_dir, eval_path=None)
    d["checkpoint"].update(every_steps=0, save_at_end=False, resume="never", async_save=False, keep_best=None,
                           keep_last=1)
    d["run"].update(name=name, storage_path=str(trials_dir), export_dir=None, address=None, trackers=[],
                    max_failures=0)
    config_from_dict(d).validate()  # a problem here is the search's, not a trial's
    return d


def layout_trial(params: dict, specs: list) -> dict:
    """Ray Tune function trainable: one layout's run (fit_in_trial), measured from its step
    records, then deleted. Never raises for a failed run: its status says oom or error."""
    from raytune_llama.trainer.tune_trials import fit_in_trial

    spec = specs[params["index"]]
    cfg = config_from_dict(spec["config"])
    out = {"index": params["index"], "run_name": cfg.run.name}
    started = time.time()
    try:
        summary = fit_in_trial(cfg)
        history = cfg.run_dir / "steps.jsonl"
        records = [json.loads(ln) for ln in history.read_text().splitlines() if ln.strip()] if history.is_file() else []
        if not records:
            return {**out, "status": ERROR, "error": "the run reported no steps", "wall_s": time.time() - started}
        out.update(steady_state(records, spec["warmup"]))
        out.update(status=OK, layout_run=summary.get("layout"), wall_s=time.time() - started)
        if summary.get("layout") and summary["layout"] != spec["describe"]:
            out.update(status=ERROR,
                       error=f"the workers ran {summary['layout']} instead (re-planned on their placement)")
        return out
    except Exception as exc:  # any failure of the run is this layout's result, not the search's
        log.warning("layout %s failed: %s", spec["describe"], exc)
        return {**out, "status": classify_failure(exc), "error": failure_message(exc), "wall_s": time.time() - started}
    finally:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)


def max_concurrent_trials(cfg: Config, ray_nodes: Sequence[dict]) -> int:
    """Trials at a time: as many whole worker groups as the cluster's devices hold, with GPU
    workers; 1 with CPU workers (their slots are logical CPUs of shared hosts: concurrent
    trials would share cores and memory bandwidth, and the data pipeline's CPUs)."""
    from raytune_llama.planner.cluster import worker_slots

    p = cfg.parallel
    if not p.use_gpu:
        return 1
    return max(1, sum(worker_slots(ray_nodes, p.use_gpu, p.cpus_per_worker)) // p.num_workers)


def _connect(cfg: Config) -> bool:
    """Ray as LlamaTrainer connects (trainer/cluster.py: run.address, else RAY_ADDRESS, else a
    local cluster sized for the workers and the data pipeline), without the Ray processes' logs
    on this terminal: the search prints one line per trial and step instead. Returns True when a
    local cluster was started here."""
    import ray

    from raytune_llama.trainer import cluster

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", cluster.FAST_HEALTH_CHECK_S)
    if ray.is_initialized():
        return False
    address = cfg.run.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    p = cfg.parallel
    ray.init(num_cpus=cluster.local_num_cpus(p.num_workers, p.cpus_per_worker, cfg.run.local_num_cpus),
             include_dashboard=False, _temp_dir=cluster.LOCAL_TEMP_DIR, log_to_driver=False,
             configure_logging=False)
    return True


def _prebuild_store(cfg: Config, tokenizer_path: str) -> str:
    """Build the whole token store before any trial (a trial's steps would otherwise share the
    CPUs with tokenizing the rest in the background); returns the store root."""
    import ray

    from raytune_llama.trainer.data_pipeline import StoreBuilder, open_token_store, store_root

    d = cfg.data
    root = store_root(d, cfg.run.storage_path)
    try:
        store = open_token_store(d, tokenizer_path, root)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from exc
    builder = StoreBuilder(store, tokenizer_path, d.shuffle_seed, d.shuffle,
                           cpus_free=ray.cluster_resources().get("CPU", 0)).start()
    builder.join()
    if builder.error:
        raise ConfigError([builder.error])
    return str(root)


def _trial_callback(out: Callable[[str], None], specs: list):
    from ray import tune

    class Lines(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            s = specs[trial.config["index"]]
            out(f"[tune-layout] layout {s['trial']} ({s['describe']}): started")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            s = specs[trial.config["index"]]
            if "step" in result and "status" not in result:  # a step the run reported (tune_trials.py)
                out(f"[tune-layout] layout {s['trial']}: step {result['step']}/{s['steps']} "
                    f"{_secs(result.get('step_time_s'))}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            s = specs[trial.config["index"]]
            what = _secs(r.get("measured_step_time_s")) + "/step" if r.get("status") == OK else \
                f"{r.get('status', 'error')}: {r.get('error', '')}"
            out(f"[tune-layout] layout {s['trial']} ({s['describe']}): {what}")

        def on_trial_error(self, iteration, trials, trial, **info):
            s = specs[trial.config["index"]]
            out(f"[tune-layout] layout {s['trial']} ({s['describe']}): the trial failed "
                f"({trial.error_file or 'see the Tune logs'})")

    return Lines()


def run_trials(specs: list, tune_dir: Path, concurrency: int, out: Callable[[str], None]) -> dict[int, dict]:
    """The trials as one Ray Tune experiment under tune_dir: index -> the trial's result."""
    from ray import tune

    # The trial only drives its run (Ray Train starts the run's own controller and workers):
    # it must not hold a CPU the run's workers need (on a 2-CPU cluster 2 workers take both),
    # and Tune refuses an empty request, so it asks for one byte of memory.
    trainable = tune.with_resources(tune.with_parameters(layout_trial, specs=specs), {"cpu": 0, "memory": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={"index": tune.grid_search(list(range(len(specs))))},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency,
                                    trial_name_creator=lambda t: f"layout-{t.config['index']}",
                                    trial_dirname_creator=lambda t: f"layout-{t.config['index']}"),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(tune_dir),
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[_trial_callback(out, specs)]),
    )
    grid = tuner.fit()
    results: dict[int, dict] = {}
    for res in grid:
        index = int(res.config["index"])
        metrics = dict(res.metrics or {})
        if "status" not in metrics:  # the trial itself died (its actor, not the run): Tune's error
            err = res.error if res.error is not None else "the trial ended without a result"
            metrics = {"status": classify_failure(err), "error": failure_message(err)}
        results[index] = metrics
    return results


def tune_layout(cfg: Config, top_k: int = 4, steps: int = 8, calibrate: bool = False,
                out: Callable[[str], None] = print) -> dict:
    """Measure the planner's top-k layouts (and parallel.layout) on the cluster Ray gives; returns
    the report (the `--json` object) and writes records.json, report.json, measured_layout.json
    and, with calibrate, profile.yaml under {run.storage_path}/{run.name}/tune_layout/."""
    import ray

    from raytune_llama.engine.hf_cache import resolve_pretrained
    from raytune_llama.engine.model_io import ensure_model
    from raytune_llama.trainer.planning import measured_layout_path, run_topology, run_workload
    from raytune_llama.trainer.run_dir import absolutize

    if steps < 2:
        raise ConfigError([f"--steps: {steps} must be at least 2 (a warm-up step, then measured ones)"])
    cfg = absolutize(cfg.validate())
    out_dir = Path(cfg.run.storage_path) / cfg.run.name / "tune_layout"
    own_cluster = _connect(cfg)
    try:
        model_path = ensure_model(cfg.model.name_or_path, cfg.model.random_init, cfg.model.seed)
        tokenizer_path = str(resolve_pretrained(cfg.model.tokenizer, "model.tokenizer")) if cfg.model.tokenizer \
            else model_path
        ray_nodes = ray.nodes()
        topology = run_topology(cfg, cfg.parallel.num_workers, ray_nodes)
        cands = candidates(cfg, model_path, topology, top_k)
        warmup = warmup_steps(steps)
        out(f"[tune-layout] {len(cands)} layout(s) of {Path(model_path).name} on {topology.describe()}, "
            f"{steps} steps each")
        store_dir = _prebuild_store(cfg, tokenizer_path)
        trials_dir = out_dir / "trials"
        token = uuid.uuid4().hex[:6]  # fresh names even beside leftovers of an interrupted search
        specs, trials = [], []
        for i, c in enumerate(cands):
            plan_ = c["plan"]
            t = {"index": i, "layout": plan_.describe() if plan_ else None,
                 "layout_spec": layout_spec(plan_) if plan_ else None, "source": c["source"],
                 "predicted_step_time_s": c["predicted_step_time_s"],
                 "predicted_memory_bytes": c["predicted_memory_bytes"],
                 "predicted_tokens_per_s": c["predicted_tokens_per_s"], "predicted_mfu": c["predicted_mfu"],
                 "measured_step_time_s": None, "measured_peak_memory_bytes": None, "measured_tokens_per_s": None,
                 "measured_mfu": None, "status": None}
            trials.append(t)
            if c.get("not_run"):
                t.update(status=ERROR, error=c["not_run"])
                continue
            name = f"{cfg.run.name}-layout-{i}-{token}"
            specs.append({"trial": i, "describe": t["layout"], "warmup": warmup, "steps": steps,
                          "config": trial_config(cfg, t["layout_spec"], name, steps, trials_dir, store_dir)})
        if specs:
            concurrency = max_concurrent_trials(cfg, ray_nodes)
            results = run_trials(specs, out_dir, concurrency, out)
            for k, spec in enumerate(specs):
                res = results.get(k, {"status": ERROR, "error": "no result from Ray Tune"})
                t = trials[spec["trial"]]
                t.update({key: res.get(key) for key in ("measured_step_time_s", "step_time_spread_pct",
                                                        "measured_peak_memory_bytes",
                                                        "measured_tokens_per_s", "measured_mfu", "steps_measured",
                                                        "step_times_s", "wall_s", "run_name", "error")
                          if res.get(key) is not None})
                t["status"] = res.get("status", ERROR)
                if t["status"] == OK and not t.get("measured_step_time_s"):
                    t.update(status=ERROR, error="no step time was measured")
        shutil.rmtree(trials_dir, ignore_errors=True)
    finally:
        if own_cluster:
            ray.shutdown()

    report = summarize(trials)
    workload = run_workload(cfg)
    context = {"model": model_path, "hardware": topology.hardware, "nodes": topology.nodes,
               "devices_per_node": topology.devices_per_node, "seq_len": cfg.data.seq_len,
               "global_batch": cfg.train.global_batch_size, "optimizer": workload.get("optimizer", "adamw"),
               "compute_dtype": workload["compute_dtype"], "lora_rank": workload["lora_rank"],
               "lora_targets": list(workload["lora_targets"]) if workload.get("lora_targets") else None,
               "attention_mask": workload["attention_mask"]}
    report.update(run_name=cfg.run.name, model_name=Path(model_path).name, cluster=topology.describe(),
                  topology=topology.to_dict(), steps=steps, warmup_steps=warmup, top_k=top_k, files={})
    ok = [t for t in trials if t["status"] == OK]
    if ok:
        records = [calibration_record(t, context) for t in ok]
        write_json(out_dir / "records.json", records)
        report["files"]["records"] = str(out_dir / "records.json")
        if calibrate:
            report["calibration"] = calibrate_from(records, ok, out_dir / "profile.yaml")
            report["files"]["profile"] = str(out_dir / "profile.yaml")
    if report["winner"] is not None:
        path = measured_layout_path(cfg)
        write_json(path, measured_layout_record(report["winner"], context, topology.to_dict(), steps))
        report["files"]["measured_layout"] = str(path)
    report["files"]["report"] = str(out_dir / "report.json")
    write_json(out_dir / "report.json", report)
    return report


def calibrate_from(records: list[dict], ok: list[dict], profile_path: Path) -> dict:
    """Fit the hardware profile to the measured layouts (planner/calibrate.py), write it, and
    rank the layouts again with the fitted profile's predictions."""
    from raytune_llama.planner.calibrate import calibrate, write_profile

    hw, cal = calibrate(records, records[0]["hardware"])
    write_profile(hw, cal, profile_path)
    after = [row["predicted_after_s"] for row in cal["runs"]]
    for t, a in zip(ok, after):
        t["predicted_step_time_s_calibrated"] = a
    for t, r in zip(ok, ranks(after)):
        t["predicted_rank_calibrated"] = r
    return {"profile": str(profile_path), "fitted": cal["fitted"], "at_bound": cal["at_bound"],
            "step_time_error_pct_before": cal["step_time_error_pct_before"],
            "step_time_error_pct_after": cal["step_time_error_pct_after"],
            "memory_error_pct_before": cal["memory_error_pct_before"],
            "memory_error_pct_after": cal["memory_error_pct_after"],
            "spearman_before": spearman([t["predicted_step_time_s"] for t in ok],
                                        [t["measured_step_time_s"] for t in ok]),
            "spearman_after": spearman(after, [t["measured_step_time_s"] for t in ok])}
