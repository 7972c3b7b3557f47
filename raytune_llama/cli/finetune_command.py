"""`raytune-llama finetune CONFIG.yaml [--set section.key=value ...] [--address ADDR] [--verbose]`."""
from __future__ import annotations

import argparse
import sys

from raytune_llama import console
from raytune_llama.cli.run_arguments import add_run_arguments, load_run_config
from raytune_llama.config import ConfigError
from raytune_llama.versions import TorchVersionError, check_torch_version


def register(subparsers) -> None:
    """Add the finetune subcommand."""
    p = subparsers.add_parser("finetune", help="fine-tune a model on a Ray cluster (local if no address)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    add_run_arguments(p, "override a config value, e.g. --set train.max_steps=20 (repeatable)")
    p.add_argument("--validate-only", action="store_true", help="check the config and exit")
    p.add_argument("--merge", action="store_true",
                   help="train.lora runs: also merge the exported adapter into the base model at EXPORT-merged "
                        "(loadable with AutoModelForCausalLM.from_pretrained; raytune-llama merge-lora does the same)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the config and the installed torch on the driver, then train."""
    try:
        cfg = load_run_config(args)
    except ConfigError as exc:
        print(f"raytune-llama: {exc}", file=sys.stderr)
        return 2
    try:
        # Before any Ray work, so an old torch stops here with the fix instead of in every
        # worker's engine import (raytune_llama/versions.py).
        check_torch_version()
    except TorchVersionError as exc:
        print(f"raytune-llama: {exc}", file=sys.stderr)
        return 2
    if args.merge and not cfg.train.lora:
        print("raytune-llama: --merge: the config has no train.lora, so the export is already a whole model",
              file=sys.stderr)
        return 2
    if args.validate_only:
        print("config OK")
        return 0
    from raytune_llama.trainer.llama_trainer import LlamaTrainer, format_summary
    from raytune_llama.trainer.run_dir import absolutize

    console.setup(args.verbose, absolutize(cfg).run_dir / "logs")
    try:
        summary = LlamaTrainer(cfg).fit()
    except ConfigError as exc:
        print(f"raytune-llama: {exc}", file=sys.stderr)
        return 2
    except BaseException:  # the error itself is printed as always; say where the hidden lines went
        console.point_to_logs()
        raise
    print(format_summary(summary), flush=True)
    if args.merge and summary.get("export_path"):
        from raytune_llama.cli.merge_lora_command import merge_run_adapter

        print(f"  merged model {merge_run_adapter(summary['export_path'])}", flush=True)
    logs = console.logs_line()  # where the lines hidden from this console went
    if logs:
        print(logs, flush=True)
    return 0
