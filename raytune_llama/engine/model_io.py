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


def supports_sharded_load(plan) -> bool:
    """Whether each rank can load only its own shard for this layout (FSDP or TP, torch)."""
    return plan.backend == "torch" and not (plan.zero_stage == 0 and plan.tp == 1 and plan.dp > 1)


def build_engine(model_path: str, plan, *, device_type: str, lr: float, weight_decay: float,
                 betas, max_grad_norm: float, mixed_precision: str | None):
    """The model laid out per `plan` in a ParallelEngine. Where the layout shards the model and
    the weights are local safetensors, the model is built on the meta device and each rank
    reads only its own tensors (and slices); otherwise from_pretrained loads it whole."""
    from transformers import AutoConfig

    from raytune_llama.engine.parallel import ParallelEngine
    from raytune_llama.engine.parallel.sharded_load import meta_model

    kwargs = dict(device=device_type, lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                  max_grad_norm=max_grad_norm or None, mixed_precision=mixed_precision)
    local = Path(model_path).is_dir() and any(Path(model_path).glob("*.safetensors"))
    if local and supports_sharded_load(plan):
        model = meta_model(AutoConfig.from_pretrained(model_path))
        return ParallelEngine(model, plan, load_from=model_path, **kwargs)
    return ParallelEngine(load_model(model_path), plan, **kwargs)


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
