"""`raytune-llama tune-layout CONFIG.yaml [--top-k 4] [--steps 8] [--json] [--calibrate]
[--set section.key=value ...] [--address ADDR]`: run the planner's best layouts for a few steps
each on the cluster (Ray Tune trials, trainer/tune_layout.py), print predicted vs measured, and
store the fastest for `parallel.layout: measured` (docs/planner.md)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from raytune_llama import console
from raytune_llama.cli.run_arguments import add_run_arguments, load_run_config
from raytune_llama.config import ConfigError
from raytune_llama.planner.errors import PlanError
from raytune_llama.versions import TorchVersionError, check_torch_version


def register(subparsers) -> None:
    """Add the tune-layout subcommand."""
    p = subparsers.add_parser(
        "tune-layout", help="measure the planner's top-k layouts on the cluster and keep the fastest",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--top-k", type=int, default=4, help="how many of the planner's best layouts to run (default 4)")
    p.add_argument("--steps", type=int, default=8,
                   help="training steps per layout (default 8; the first 1-2 are warm-up, not measured)")
    p.add_argument("--calibrate", action="store_true",
                   help="also fit the hardware profile to the measurements (tune_layout/profile.yaml) and rank "
                        "the layouts again with it")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    add_run_arguments(p, "override a config value, e.g. --set train.global_batch_size=16 (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate, measure, print; exit 0 with a winner, 1 when no layout ran, 2 on a bad config."""
    if args.top_k < 1:
        print(f"raytune-llama: --top-k {args.top_k}: must be at least 1", file=sys.stderr)
        return 2
    try:
        cfg = load_run_config(args)
        check_torch_version()
    except (ConfigError, TorchVersionError) as exc:
        print(f"raytune-llama: {exc}", file=sys.stderr)
        return 2
    from pathlib import Path

    from raytune_llama.trainer.tune_layout import format_report, tune_layout

    # Next to the measurements (trainer/tune_layout.py: STORAGE/NAME/tune_layout)
    console.setup(args.verbose, Path(cfg.run.storage_path).expanduser().resolve() / cfg.run.name / "tune_layout"
                  / "logs")

    def progress(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    # With --json, stdout carries the JSON object only: whatever Ray, Tune or the trials print
    # while the search runs goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with quiet:
            report = tune_layout(cfg, top_k=args.top_k, steps=args.steps, calibrate=args.calibrate, out=progress)
    except (ConfigError, PlanError) as exc:
        print(f"raytune-llama: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1, default=str), flush=True)
    else:
        print(format_report(report), flush=True)
    return 0 if report["winner"] is not None else 1
