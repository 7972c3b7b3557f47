"""Which checkpoints a run keeps when `checkpoint.keep_best: eval_loss` asks for the best one
besides the last `checkpoint.keep_last` (docs/data.md "Evaluation").

Ray Train's own retention keeps either the newest N or the N best by a score, not both, so
with keep_best the run registers every checkpoint with Ray Train (num_to_keep None) and rank 0
prunes after each one: the newest keep_last folders stay, and so does the one with the lowest
validation loss, named in `{run_dir}/best_checkpoint.json`. A checkpoint gets a score only
when an evaluation ran at its step (with keep_best every checkpoint step evaluates). Resume
always takes the newest valid checkpoint (trainer/checkpoint_report.py), never the best.
Needs a filesystem run.storage_path; on a URI Ray Train uploads and the folders are its own.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

from raytune_llama.engine.atomic_files import write_json_atomic
from raytune_llama.engine.checkpoint_io import unfinished_write

log = logging.getLogger(__name__)
BEST = "best_checkpoint.json"


def best_checkpoint(run_dir: Path) -> Optional[dict]:
    """{"path", "step", "eval_loss"} of the best checkpoint so far, or None."""
    path = Path(run_dir) / BEST
    return json.loads(path.read_text()) if path.is_file() else None


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder of the run (Ray's names sort by time)."""
    folders = sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir() and not unfinished_write(p))
    return folders[-1] if folders else None


def record_and_prune(run_dir: Path, folder: Path, step: int, eval_loss: Optional[float], keep_last: int) -> dict:
    """Rank 0, after `folder` (the checkpoint of `step`) is complete and registered: make it the
    best if its eval_loss is the lowest yet, then delete every folder that is neither among the
    newest keep_last nor the best. Returns the best record."""
    run_dir = Path(run_dir)
    best = best_checkpoint(run_dir)
    if best is not None and not Path(best["path"]).is_dir():
        best = None  # removed by hand: the next scored checkpoint takes its place
    if eval_loss is not None and (best is None or eval_loss < best["eval_loss"]):
        best = {"path": str(folder), "step": step, "eval_loss": float(eval_loss)}
        write_json_atomic(run_dir / BEST, best)
    folders = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir() and not unfinished_write(p))
    keep = {p.name for p in folders[-keep_last:]} | ({Path(best["path"]).name} if best else set())
    for old in folders:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed checkpoint %s (not among the last %d, not the best)", old.name, keep_last)
    return best or {}
