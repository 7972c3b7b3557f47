"""Hyperparameter sweeps with Ray Tune (`raytune-llama sweep`, docs/tune.md): a `Tuner` whose
trials are whole raytune_llama runs of one config (trainer/tune_trials.py), each with the
planner's layout for its resources, sampled values of the swept fields, an early-stopping
scheduler fed by the validation loss the runs report while they train, and a report at the
end: the best trial's config, metrics and checkpoint, a results table and the loss curves of
every trial, written under `{run.storage_path}/{run.name}-sweep/`.

    --param train.lr=loguniform:1e-5:1e-3     sampled log-uniformly
    --param train.lr=uniform:1e-4:1e-3        uniformly
    --param train.warmup_steps=randint:0:20   an integer in [0, 20)
    --param train.warmup_steps=choice:0,10    one of the values (YAML-parsed)
    --param train.lr=grid:1e-4,3e-4,1e-3      every value, each num_samples times (Tune's grid_search)
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from raytune_llama.config import SECTIONS, Config, ConfigError, apply_overrides, config_from_dict
from raytune_llama.trainer.checkpoint_retention import newest_checkpoint
from raytune_llama.trainer.run_dir import absolutize

log = logging.getLogger(__name__)
KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
SCHEDULERS = ("asha", "median", "fifo")
TRIAL_DRIVER_MEMORY = 2**20  # bytes reserved by a trial's driver (Tune needs a non-empty bundle)


@dataclass(frozen=True)
class Param:
    """One swept config field and its distribution."""

    key: str
    kind: str
    values: tuple

    def space(self):
        """The Ray Tune search space of this parameter."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "randint":
            return tune.randint(*self.values)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))


def parse_param(text: str) -> Param:
    """'train.lr=loguniform:1e-5:1e-3' → Param; a ConfigError names what is wrong and the fix."""
    usage = ("--param SECTION.KEY=KIND:ARGS, e.g. train.lr=loguniform:1e-5:1e-3 or "
             "train.warmup_steps=choice:0,10 (kinds: " + ", ".join(KINDS) + ")")
    if "=" not in text or ":" not in text.split("=", 1)[1]:
        raise ConfigError([f"--param {text!r}: expected {usage}"])
    key, spec = text.split("=", 1)
    key, (kind, args) = key.strip(), spec.split(":", 1)
    section, _, name = key.partition(".")
    if section not in SECTIONS or name not in SECTIONS[section].__dataclass_fields__:
        raise ConfigError([f"--param {text!r}: {key!r} is not a config field (section.key of "
                           f"{sorted(SECTIONS)}; see raytune_llama/config.py)"])
    if kind not in KINDS:
        raise ConfigError([f"--param {text!r}: unknown kind {kind!r}; use one of {list(KINDS)}"])
    if kind in ("choice", "grid"):
        values = tuple(_value(v) for v in args.split(","))
    else:
        parts = args.split(":")
        try:
            values = tuple(float(v) if kind != "randint" else int(v) for v in parts)
        except ValueError:
            values = ()
        if len(values) != 2 or values[0] >= values[1] or (kind == "loguniform" and values[0] <= 0):
            raise ConfigError([f"--param {text!r}: {kind} takes LOW:HIGH with LOW < HIGH"
                               + (" and LOW > 0" if kind == "loguniform" else "")])
    if not values:
        raise ConfigError([f"--param {text!r}: no values; expected {usage}"])
    return Param(key, kind, values)


def _value(text: str):
    """A choice value: a number when it reads as one (YAML 1.1 reads '3e-3' as a string), else YAML."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def sweep_metric(cfg: Config, metric: Optional[str]) -> str:
    """The metric to optimize: eval_loss when the config has validation data, else the
    training loss (what the issue's fallback asks); a requested eval_loss without validation
    data is a ConfigError naming the fix."""
    has_eval = cfg.data.eval_path is not None or bool(cfg.data.eval_fraction)
    if metric is None:
        return "eval_loss" if has_eval else "loss"
    if metric == "eval_loss" and not has_eval:
        raise ConfigError(["--metric eval_loss: the config has no validation data; set data.eval_fraction (e.g. "
                           "--set data.eval_fraction=0.05) or data.eval_path, or use --metric loss"])
    if metric not in ("eval_loss", "loss"):
        raise ConfigError([f"--metric {metric!r}: use eval_loss or loss"])
    return metric


def trial_config(base: dict, params: dict[str, Any], run_name: str) -> Config:
    """The config of one trial: the base with the sampled values and the trial's own run name."""
    from raytune_llama.trainer.tune_trials import as_overrides

    data = apply_overrides(json.loads(json.dumps(base)), as_overrides(params) + [f"run.name={run_name}"])
    return config_from_dict(data).validate()


def scheduler_for(name: str, metric_steps: int, max_steps: int):
    """ASHA / median stopping on the run's `step` axis (grace: the first evaluation), or None."""
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    grace = max(1, metric_steps)
    if name == "asha":
        # max_t past the last step: at max_t ASHA stops the trial, which would end a finished
        # run's driver before it writes its summary and export.
        return ASHAScheduler(time_attr="step", max_t=max_steps + 1, grace_period=grace, reduction_factor=2)
    if name == "median":
        return MedianStoppingRule(time_attr="step", grace_period=grace, min_samples_required=2)
    return None


def run_sweep(cfg: Config, params: list[Param], samples: int, scheduler: str = "asha",
              metric: Optional[str] = None, max_concurrent: Optional[int] = None) -> dict:
    """Run the sweep on the connected Ray cluster; returns the report (also written to disk)."""
    from ray import tune

    from raytune_llama.trainer.tune_trials import fit_in_trial

    if scheduler not in SCHEDULERS:
        raise ConfigError([f"--scheduler {scheduler!r}: use one of {list(SCHEDULERS)}"])
    metric = sweep_metric(cfg, metric)
    t = cfg.train
    # The metric must reach Tune often enough for the scheduler to compare trials.
    every = t.eval_every_steps if metric == "eval_loss" and t.eval_every_steps else t.log_every
    base = absolutize(cfg).to_dict()  # trials run in other processes, other directories
    if metric == "eval_loss" and not t.eval_every_steps:
        base["train"]["eval_every_steps"] = every = max(1, t.max_steps // 4)
    name = f"{cfg.run.name}-sweep"
    out_dir = Path(cfg.run.storage_path).absolute() / name

    def trial(sampled: dict) -> None:
        context = tune.get_context()
        fit_in_trial(trial_config(base, sampled, f"{name}-{context.get_trial_id()}"), metric=metric)

    tuner = tune.Tuner(
        # The trial only drives its run (the run's workers hold the CPUs): no CPU, so that a
        # cluster exactly the size of one run can hold a trial. Tune refuses an empty bundle.
        tune.with_resources(trial, {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY}),
        param_space={p.key: p.space() for p in params},
        tune_config=tune.TuneConfig(metric=metric, mode="min", num_samples=samples,
                                    scheduler=scheduler_for(scheduler, every, t.max_steps),
                                    max_concurrent_trials=max_concurrent or 1),
        run_config=tune.RunConfig(name=name, storage_path=str(out_dir.parent), verbose=1),
    )
    grid = tuner.fit()
    report = sweep_report(grid, cfg, params, metric, out_dir)
    return report


def _history(result) -> list[dict]:
    frame = result.metrics_dataframe
    if frame is None or "step" not in frame:
        return []
    keep = [c for c in ("step", "loss", "eval_loss") if c in frame]
    return json.loads(frame[keep].to_json(orient="records"))


def sweep_report(grid, cfg: Config, params: list[Param], metric: str, out_dir: Path) -> dict:
    """The trials (config, status, last metrics), the best one, results.json / results.csv and
    loss_curves.png under out_dir."""
    trials = []
    for result in grid:
        m = result.metrics or {}
        history = _history(result)
        last_step = int(m.get("step") or 0)
        status = "error" if result.error else ("finished" if last_step >= cfg.train.max_steps else "stopped early")
        trials.append({
            "trial": Path(result.path).name if result.path else None,
            "run_name": f"{cfg.run.name}-sweep-{m['trial_id']}" if m.get("trial_id") else None,  # trial_config's
            "params": {p.key: (result.config or {}).get(p.key) for p in params},
            "status": status, "steps": last_step, "loss": m.get("loss"), metric: m.get(metric),
            "error": str(result.error).splitlines()[0][:300] if result.error else None, "history": history,
        })
    scored = [t for t in trials if t["status"] == "finished" and _finite(t.get(metric))]
    best = min(scored, key=lambda t: t[metric]) if scored else None
    if best is not None:
        best = dict(best)
        run_dir = Path(cfg.run.storage_path).absolute() / best["run_name"]
        best["run_dir"] = str(run_dir)
        checkpoint = newest_checkpoint(run_dir)
        best["checkpoint"] = str(checkpoint) if checkpoint else None
        best["export_path"] = str(run_dir / "export") if (run_dir / "export").is_dir() else None
        best["config_overrides"] = [f"{k}={json.dumps(v)}" for k, v in best["params"].items()]
    report = {"metric": metric, "mode": "min", "trials": trials, "best": best, "out_dir": str(out_dir)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "results.csv").write_text(results_csv(trials, params, metric))
    plot_trials(trials, metric, out_dir / "loss_curves.png")
    return report


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def results_csv(trials: list[dict], params: list[Param], metric: str) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial", *[p.key for p in params], "status", "steps", "loss", metric])
    for t in trials:
        writer.writerow([t["trial"], *[t["params"][p.key] for p in params], t["status"], t["steps"], t["loss"],
                         t.get(metric)])
    return buf.getvalue()


def plot_trials(trials: list[dict], metric: str, path: Path) -> None:
    """Training loss (thin) and validation loss (points) of every trial against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, t in enumerate(trials):
        color = f"C{i % 10}"
        label = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in t["params"].items()) + f" ({t['status']})"
        pts = [(h["step"], h["loss"]) for h in t["history"] if _finite(h.get("loss"))]
        if pts:
            ax.plot(*zip(*pts), color=color, linewidth=1, alpha=0.6, label=label)
        evals = [(h["step"], h["eval_loss"]) for h in t["history"] if _finite(h.get("eval_loss"))]
        if evals:
            ax.plot(*zip(*evals), color=color, marker="o", linestyle="--", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (lines: training, points: validation)")
    ax.set_title(f"sweep: {len(trials)} trials, metric {metric}")
    ax.grid(True, alpha=0.3)
    if trials:
        ax.legend(fontsize=7, loc="upper right")
    fig.savefig(path, format="png")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_report(report: dict) -> str:
    """The results table and the best trial, for the terminal."""
    metric = report["metric"]
    lines = [f"{'trial':<28} {'status':<14} {'steps':>5} {'loss':>8} {metric:>10}  params"]
    for t in sorted(report["trials"], key=lambda t: (t.get(metric) is None, t.get(metric) or 0)):
        value = t.get(metric)
        lines.append(f"{str(t['trial'])[:28]:<28} {t['status']:<14} {t['steps']:>5} "
                     f"{(t['loss'] if _finite(t['loss']) else float('nan')):>8.4f} "
                     f"{(value if _finite(value) else float('nan')):>10.4f}  {json.dumps(t['params'])}")
    best = report["best"]
    if best is None:
        lines.append("no trial finished with a finite metric")
    else:
        lines.append(f"best: {json.dumps(best['params'])} -> {metric} {best[metric]:.4f}")
        lines.append(f"  run {best['run_dir']}")
        lines.append(f"  checkpoint {best.get('checkpoint')}")
        lines.append("  rerun it: raytune-llama finetune CONFIG.yaml " + " ".join(
            f"--set '{o}'" for o in best["config_overrides"]))
    lines.append(f"results: {report['out_dir']}/results.csv, loss curves: {report['out_dir']}/loss_curves.png")
    return "\n".join(lines)
