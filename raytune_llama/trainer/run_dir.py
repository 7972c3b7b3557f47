"""Driver-side paths of a run: absolute paths for everything workers read or write, and
the checkpoints Ray Train already holds for this run name."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from raytune_llama.config import Config
from raytune_llama.engine.hf_cache import looks_like_hub_id
from raytune_llama.engine.atomic_files import write_bytes_atomic


def _abs(path: str | None) -> str | None:
    if path is None or looks_like_hub_id(path):
        return path
    return str(Path(path).expanduser().resolve())


def absolutize(cfg: Config) -> Config:
    """Copy of cfg with local paths made absolute (workers do not share the driver's cwd)."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name_or_path=_abs(cfg.model.name_or_path), tokenizer=_abs(cfg.model.tokenizer)),
        data=dataclasses.replace(cfg.data, path=_abs(cfg.data.path) if cfg.data.file_reader != "hf" else cfg.data.path,
                                 eval_path=_abs(cfg.data.eval_path) if cfg.data.file_reader != "hf" else cfg.data.eval_path,
                                 store_dir=_abs(cfg.data.store_dir)),
        run=dataclasses.replace(cfg.run, storage_path=_abs(cfg.run.storage_path), export_dir=_abs(cfg.run.export_dir)),
    )


def existing_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories persisted for this run (oldest first), leaving out folders whose
    in-place write a crash interrupted (never a checkpoint; trainer/checkpoint_report.py)."""
    from raytune_llama.engine.checkpoint_io import unfinished_write

    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir() and not unfinished_write(p))


def merge_step_history(run_dir: Path, records: list[dict]) -> list[dict]:
    """Append this invocation's step records to RUN_DIR/steps.jsonl (replacing any steps a
    restart re-ran) and return the whole history, for reports that span resumes."""
    path = run_dir / "steps.jsonl"
    history = []
    if path.is_file():
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    first_new = min((r["step"] for r in records), default=None)
    if first_new is not None:
        history = [r for r in history if r["step"] < first_new] + list(records)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in history).encode())
    return history
