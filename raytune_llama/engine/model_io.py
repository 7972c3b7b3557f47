"""Model files: create a random-weight model from a preset once (written to a temporary sibling
directory and renamed into place, so a crash never leaves a half-written model where a loader
would find it), find a model folder (a local path or a hub id in the HF cache), and build the
ParallelEngine from its safetensors, each rank reading only what it keeps (build_engine)."""
from __future__ import annotations

import os
from pathlib import Path

from raytune_llama.engine.atomic_files import write_dir_atomic
from raytune_llama.engine.hf_cache import resolve_pretrained
from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, load_tokenizer
from raytune_llama.presets import preset_config


def create_random_model(path: str | os.PathLike, preset: str, seed: int = 0) -> Path:
    """Save a model of the preset's shape with seeded random weights, plus the shipped
    tokenizer, as an HF model directory (config.json, model.safetensors, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = preset_config(preset)

    def write(tmp: Path) -> None:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(SHIPPED_TOKENIZER).save_pretrained(tmp)

    return write_dir_atomic(path, write)


def ensure_model(name_or_path: str, random_init: str | None, seed: int = 0) -> str:
    """The local folder to load: creates it from `random_init` when the directory is empty;
    a hub id resolves to its snapshot in the HF cache (engine/hf_cache.py)."""
    path = Path(name_or_path).expanduser()
    if random_init and not (path / "config.json").is_file():
        create_random_model(path, random_init, seed)
    return str(resolve_pretrained(name_or_path))


MASTER_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def master_dtype(master_weights: str):
    """torch dtype of the trained weights and optimizer state (parallel.master_weights)."""
    import torch

    if master_weights not in MASTER_DTYPES:
        raise ValueError(f"parallel.master_weights: {master_weights!r} is not one of {sorted(MASTER_DTYPES)}")
    return getattr(torch, MASTER_DTYPES[master_weights])


def _local_model_folder(model_path: str) -> Path:
    """resolve_pretrained, with the error a worker gives when the folder the driver resolved is
    not on storage this node sees."""
    path = Path(model_path)
    if path.is_absolute() and not path.exists():
        import socket

        raise FileNotFoundError(
            f"model folder {model_path} (resolved on the driver from model.name_or_path) is not visible on "
            f"host {socket.gethostname()}: the model (for a hub id: HF_HOME) must be on storage every node mounts")
    return resolve_pretrained(model_path)


def build_engine(model_path: str, plan, *, device_type: str, lr: float, weight_decay: float,
                 betas, max_grad_norm: float, mixed_precision: str | None, master_weights: str = "fp32",
                 lora: dict | None = None):
    """The model laid out per `plan` in a ParallelEngine, for every layout and backend without
    any rank holding the whole model in host memory: built on the meta device in the master
    dtype (fp32 by default, whatever dtype the checkpoint declares), then each rank allocates
    only what it keeps on its device and reads only those tensors or slices from the
    safetensors files (DeepSpeed ZeRO-3: DeepSpeed's own partitioned construction).
    lora (`train.lora`: r, alpha, dropout, target_modules): peft LoRA adapters in the master
    dtype are trained on the frozen base, held in the compute dtype (docs/lora.md)."""
    from transformers import AutoConfig

    from raytune_llama.engine.parallel import ParallelEngine
    from raytune_llama.engine.parallel.lora import lora_settings
    from raytune_llama.engine.parallel.plan_check import check_plan
    from raytune_llama.engine.parallel.sharded_load import meta_model

    lora = lora_settings(lora)
    check_plan(plan, lora=lora, master_weights=master_weights)  # before anything is read (model rules: the engine)
    path = _local_model_folder(model_path)
    dtype = master_dtype(master_weights)
    if not any(path.glob("*.safetensors")):
        raise ValueError(
            f"model.name_or_path: {path} has no *.safetensors files (a pickled .bin checkpoint would be loaded "
            f"whole on every rank); convert it once: AutoModelForCausalLM.from_pretrained(path)"
            f".save_pretrained(new_folder, safe_serialization=True), and point model.name_or_path there")
    # Pure bf16 weights compute in bf16 already: no autocast / mixed-precision policy on top.
    compute = None if master_weights == "bf16" else mixed_precision
    if plan.backend == "deepspeed" and compute == "bf16":
        # DeepSpeed's bf16 mode holds the module in bf16 and builds its fp32 masters from it:
        # building in bf16 halves the load's peak (an fp32 checkpoint is rounded to bf16 once).
        dtype = master_dtype("bf16")
    model = meta_model(AutoConfig.from_pretrained(path), dtype=dtype)
    return ParallelEngine(model, plan, load_from=str(path), device=device_type, lr=lr, weight_decay=weight_decay,
                          betas=tuple(betas), max_grad_norm=max_grad_norm or None, mixed_precision=compute,
                          lora=lora)
