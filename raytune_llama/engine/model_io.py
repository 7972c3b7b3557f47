"""Model files: create a random-weight model from a preset once, load through the real
`AutoModelForCausalLM.from_pretrained` path, and export with safetensors. Every write goes
to a temporary sibling directory first and is renamed into place, so a crash never leaves
a half-written model where a loader would find it."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, load_tokenizer
from raytune_llama.presets import preset_hf_config


def _atomic_dir(final: Path, write) -> Path:
    """Call write(tmp_dir), then rename tmp_dir to final (replacing nothing that exists)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def create_random_model(path: str | os.PathLike, preset: str, seed: int = 0) -> Path:
    """Save a model of the preset's shape with seeded random weights, plus the shipped
    tokenizer, as an HF model directory (config.json, model.safetensors, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = {k: v for k, v in preset_hf_config(preset).items() if not k.startswith("_")}
    for key in ("torch_dtype", "dtype", "architectures"):
        hf.pop(key, None)  # weights are created in fp32; the dtype is chosen at load time
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)

    def write(tmp: Path) -> None:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(SHIPPED_TOKENIZER).save_pretrained(tmp)

    return _atomic_dir(Path(path), write)


def ensure_model(name_or_path: str, random_init: str | None, seed: int = 0) -> str:
    """Return the model to load: creates it from `random_init` when the directory is empty."""
    path = Path(name_or_path).expanduser()
    if random_init and not (path / "config.json").is_file():
        create_random_model(path, random_init, seed)
    return str(path.resolve()) if path.exists() else name_or_path


def load_model(name_or_path: str, dtype=None):
    """AutoModelForCausalLM.from_pretrained (local directory or hub id)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def export_model(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """save_pretrained (safetensors) + tokenizer into out_dir, atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(Path(out_dir), write)
