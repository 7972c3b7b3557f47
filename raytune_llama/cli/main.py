"""`raytune-llama` command line: finetune | plan | estimate | calibrate | dryrun | merge-lora |
sweep | tune-layout.

    raytune-llama finetune examples/configs/tiny_cpu.yaml --set train.max_steps=20
    raytune-llama plan --model llama3-70b --hardware mi250 --nodes 8 --devices-per-node 8 \
        --seq-len 1024 --global-batch 512
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from raytune_llama.cli import dryrun_command, finetune_command, merge_lora_command, plan_commands, sweep_command
from raytune_llama.cli import tune_layout_command


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (subcommands registered by their modules)."""
    parser = argparse.ArgumentParser(prog="raytune-llama", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    finetune_command.register(sub)
    plan_commands.register(sub)
    dryrun_command.register(sub)
    merge_lora_command.register(sub)
    sweep_command.register(sub)
    tune_layout_command.register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
