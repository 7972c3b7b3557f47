"""Dry run of a layout under a fake process group and fake tensors (engine/dryrun/run.py)."""
from .run import dry_run, dry_run_isolated, pipeline_rank, predicted_breakdown

__all__ = ["dry_run", "dry_run_isolated", "pipeline_rank", "predicted_breakdown"]
