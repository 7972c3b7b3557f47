"""Driver-side paths of a run: absolute paths for everything workers read or write, and
the checkpoints Ray Train already holds for this run name."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from raytune_llama.config import Config
from raytune_llama.config_checks import looks_like_hub_id


def _abs(path: str | None) -> str | None:
    if path is None or looks_like_hub_id(path):
        return path
    return str(Path(path).expanduser().resolve())


def absolutize(cfg: Config) -> Config:
    """Copy of cfg with local paths made absolute (workers do not share the driver's cwd)."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name_or_path=_abs(cfg.model.name_or_path), tokenizer=_abs(cfg.model.tokenizer)),
        data=dataclasses.replace(cfg.data, path=_abs(cfg.data.path) if cfg.data.format != "hf" else cfg.data.path),
        run=dataclasses.replace(cfg.run, storage_path=_abs(cfg.run.storage_path), export_dir=_abs(cfg.run.export_dir)),
    )


def existing_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories Ray Train has persisted for this run (oldest first)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
