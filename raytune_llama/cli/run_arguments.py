"""What the commands that start runs (finetune, sweep, tune-layout) share: the --set overrides,
--address and --verbose flags, and the validated Config they make."""
from __future__ import annotations

import argparse

from raytune_llama import console
from raytune_llama.config import Config, load_config


def add_run_arguments(p: argparse.ArgumentParser, set_help: str) -> None:
    """--set SECTION.KEY=VALUE (repeatable; `set_help` says what it applies to), --address, --verbose."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=set_help)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    console.add_verbose_flag(p)


def load_run_config(args: argparse.Namespace) -> Config:
    """args.config with the --set overrides and --address (as run.address), validated; a bad
    value raises ConfigError."""
    overrides = list(args.overrides) + ([f"run.address={args.address}"] if args.address else [])
    return load_config(args.config, overrides).validate()
