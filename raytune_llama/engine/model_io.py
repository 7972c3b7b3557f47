"""Model files: create a random-weight model from a preset once, load through the real
`AutoModelForCausalLM.from_pretrained` path, and export with safetensors. Every write goes
to a temporary sibling directory first and is renamed into place, so a crash never leaves
a half-written model where a loader would find it."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from raytune_llama.engine.hf_cache import resolve_pretrained
from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, load_tokenizer
from raytune_llama.presets import preset_hf_config

log = logging.getLogger(__name__)


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
    """The local folder to load: creates it from `random_init` when the directory is empty;
    a hub id resolves to its snapshot in the HF cache (engine/hf_cache.py)."""
    path = Path(name_or_path).expanduser()
    if random_init and not (path / "config.json").is_file():
        create_random_model(path, random_init, seed)
    return str(resolve_pretrained(name_or_path))


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


MASTER_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def master_dtype(master_weights: str):
    """torch dtype of the trained weights and optimizer state (parallel.master_weights)."""
    import torch

    if master_weights not in MASTER_DTYPES:
        raise ValueError(f"parallel.master_weights: {master_weights!r} is not one of {sorted(MASTER_DTYPES)}")
    return getattr(torch, MASTER_DTYPES[master_weights])


def build_engine(model_path: str, plan, *, device_type: str, lr: float, weight_decay: float,
                 betas, max_grad_norm: float, mixed_precision: str | None, master_weights: str = "fp32"):
    """The model laid out per `plan` in a ParallelEngine, for every layout and backend without
    any rank holding the whole model in host memory: built on the meta device in the master
    dtype (fp32 by default, whatever dtype the checkpoint declares), then each rank allocates
    only what it keeps on its device and reads only those tensors or slices from the
    safetensors files (DeepSpeed ZeRO-3: DeepSpeed's own partitioned construction). A
    checkpoint without safetensors (pickled .bin) is loaded whole, with a warning."""
    from transformers import AutoConfig

    from raytune_llama.engine.parallel import ParallelEngine
    from raytune_llama.engine.parallel.sharded_load import meta_model

    path = resolve_pretrained(model_path)
    dtype = master_dtype(master_weights)
    if master_weights == "bf16" and plan.backend == "deepspeed":
        raise ValueError("parallel.master_weights: 'bf16' needs backend 'torch' (DeepSpeed's bf16 mode always "
                         "keeps fp32 master weights); use master_weights: fp32 or a torch layout")
    # Pure bf16 weights compute in bf16 already: no autocast / mixed-precision policy on top.
    compute = None if master_weights == "bf16" else mixed_precision
    kwargs = dict(device=device_type, lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                  max_grad_norm=max_grad_norm or None, mixed_precision=compute)
    if any(path.glob("*.safetensors")):
        model = meta_model(AutoConfig.from_pretrained(path), dtype=dtype)
        return ParallelEngine(model, plan, load_from=str(path), **kwargs)
    log.warning("%s has no safetensors files: loading the whole model on every rank (convert it with "
                "save_pretrained(..., safe_serialization=True) to load only each rank's shards)", path)
    return ParallelEngine(load_model(str(path), dtype=dtype), plan, **kwargs)


def hf_model_with(model_path: str, state_dict: dict):
    """A CPU HF model of the checkpoint's architecture holding `state_dict` (for export)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    missing, unexpected = model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                                                 for k, v in state_dict.items()}, strict=False)
    # rotary buffers are not parameters and may be absent from a gathered state
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"export: gathered state does not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    return model
