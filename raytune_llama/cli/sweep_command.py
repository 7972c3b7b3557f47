"""`raytune-llama sweep CONFIG.yaml --param train.lr=loguniform:1e-5:1e-3 [--param ...]
[--samples 8] [--scheduler asha|median|fifo] [--metric eval_loss|loss] [--max-concurrent N]
[--set section.key=value ...] [--address ADDR] [--json]` (docs/tune.md)."""
from __future__ import annotations

import argparse
import json
import sys

from raytune_llama import console
from raytune_llama.cli.run_arguments import add_run_arguments, load_run_config
from raytune_llama.config import ConfigError


def register(subparsers) -> None:
    """Add the sweep subcommand."""
    p = subparsers.add_parser("sweep", help="hyperparameter sweep of a fine-tune with Ray Tune (early stopping on "
                                            "the validation loss)")
    p.add_argument("config", help="YAML config of the runs to sweep")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="SECTION.KEY=KIND:ARGS",
                   help="a swept field: loguniform:LOW:HIGH, uniform:LOW:HIGH, randint:LOW:HIGH, choice:A,B,... "
                        "or grid:A,B,... (repeatable)")
    p.add_argument("--samples", type=int, default=8, help="trials to sample (grid: repetitions of the grid)")
    p.add_argument("--scheduler", default="asha", choices=("asha", "median", "fifo"),
                   help="early stopping: ASHA (default), median stopping rule, or none")
    p.add_argument("--metric", default=None, help="eval_loss (default with validation data) or loss")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at a time (default 1: each trial is a whole multi-worker run)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_run_arguments(p, "override a config value for every trial (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raytune_llama.trainer import cluster
    from raytune_llama.trainer.sweep import format_report, parse_param, run_sweep, sweep_metric

    try:
        cfg = load_run_config(args)
        params = [parse_param(p) for p in args.params]
        if not params:
            raise ConfigError(["--param: give at least one swept field, e.g. --param train.lr=loguniform:1e-5:1e-3"])
        if args.samples < 1:
            raise ConfigError([f"--samples {args.samples}: must be >= 1"])
        sweep_metric(cfg, args.metric)
    except ConfigError as exc:
        print(f"raytune-llama: {exc}", file=sys.stderr)
        return 2
    from pathlib import Path

    # Next to the sweep's own folder (trainer/sweep.py: STORAGE/NAME-sweep)
    console.setup(args.verbose, Path(cfg.run.storage_path).absolute() / f"{cfg.run.name}-sweep" / "logs")
    p = cfg.parallel
    own = cluster.connect(cfg.run.address, cluster.local_num_cpus(p.num_workers, p.cpus_per_worker,
                                                                    cfg.run.local_num_cpus), with_dashboard=True)
    try:
        report = run_sweep(cfg, params, args.samples, args.scheduler, args.metric, args.max_concurrent)
    except ConfigError as exc:
        print(f"raytune-llama: {exc}", file=sys.stderr)
        return 2
    finally:
        if own:
            import ray

            ray.shutdown()
    if args.json:
        print(json.dumps({k: v for k, v in report.items()}, default=str))
    else:
        print(format_report(report), flush=True)
    return 0 if report["best"] is not None else 1
