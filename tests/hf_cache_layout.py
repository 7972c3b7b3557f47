"""Lay out a model in a Hugging Face hub cache exactly as `hf download` leaves it, with no
network: `HF_HOME/hub/models--ORG--NAME/` holding `blobs/<sha256>` (the file contents),
`snapshots/<revision>/<file>` (relative symlinks to the blobs) and `refs/main` (the revision).
The weights are written as sharded safetensors with `model.safetensors.index.json`, in the
dtype a real release declares (bf16 for Llama 3), so tests walk the same files a 70B run reads.

    snapshot = write_hub_model(tmp / "hf", "meta-llama/Meta-Llama-3-70B", config, seed=0)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _store(repo_dir: Path, snapshot: Path, name: str, source: Path) -> None:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    blob = repo_dir / "blobs" / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, blob)
    link = snapshot / name
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, link.parent), link)


def write_hub_model(hf_home: str | os.PathLike, repo_id: str, config, *, seed: int = 0, dtype: str = "bfloat16",
                    max_shard_size: str = "200KB", tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Random weights of `config` (a transformers config) saved in `dtype` as sharded
    safetensors under HF_HOME's hub cache for `repo_id`; returns the snapshot folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, load_tokenizer

    repo_dir = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / REVISION
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        load_tokenizer(tokenizer_dir or SHIPPED_TOKENIZER).save_pretrained(tmp)
        config_json = json.loads((Path(tmp) / "config.json").read_text())
        config_json.pop("dtype", None)
        config_json["torch_dtype"] = dtype  # the key (and value) a real Llama 3 release declares
        (Path(tmp) / "config.json").write_text(json.dumps(config_json, indent=2))
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                _store(repo_dir, snapshot, str(path.relative_to(tmp)), path)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(REVISION)
    return snapshot
