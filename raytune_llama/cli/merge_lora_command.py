"""`raytune-llama merge-lora`: a LoRA adapter (peft format, what a `train.lora` run exports) merged
into its base model, written as a plain HF model directory (docs/lora.md).

    raytune-llama merge-lora --base MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR

The base's safetensors are streamed one tensor at a time: each targeted weight becomes
W + (B @ A) * scaling (computed in fp32, stored in the base tensor's dtype, as peft's
`merge_and_unload` does), every other tensor is copied; the output is written in parts of at most
--max-shard-bytes (HF naming and index), with the base's config.json and the tokenizer (the
adapter's, else the base's). Peak memory: the adapter, one base tensor and one output part,
never the whole model.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def register(subparsers: Any) -> None:
    """Add the merge-lora subcommand (imports nothing heavy: the parser is built for every command)."""
    p = subparsers.add_parser("merge-lora", help="merge a LoRA adapter (peft format) into its base model, "
                                                 "streamed tensor by tensor, as an HF model directory")
    p.add_argument("--base", required=True, help="base model: a folder with safetensors, or a hub id in the HF cache")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--max-shard-bytes", type=int, default=None,
                   help="largest output safetensors part (default: the export's, 5 GiB as save_pretrained)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of the subcommand."""
    out = merge_lora(args.base, args.adapter, args.out, args.max_shard_bytes)
    print(f"merged model written to {out}")
    return 0


def adapter_scaling(config: dict, adapter_dir: Path) -> float:
    """The adapter's output scale (lora_alpha / r, or / sqrt(r) with use_rslora); refuses what a
    plain W + B @ A * scaling merge cannot express, naming the field."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA adapters merge)")
    for field in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(field):
            problems.append(f"{field}: {config[field]!r} (not supported by merge-lora; use peft's merge_and_unload)")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            problems.append(f"{field}: {config[field]!r} (per-module ranks are not supported by merge-lora)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save: {config['modules_to_save']!r} (full module copies are not merged)")
    if problems:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: " + "; ".join(problems))
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / r ** 0.5 if config.get("use_rslora") else alpha / r


def adapter_pairs(adapter_dir: Path) -> dict[str, tuple[str, str]]:
    """Base weight name -> (lora_A key, lora_B key) of the adapter's safetensors."""
    from safetensors import safe_open

    from raytune_llama.engine.parallel.lora import PEFT_PREFIX

    with safe_open(adapter_dir / ADAPTER_WEIGHTS, framework="pt") as f:
        keys = set(f.keys())
    pairs = {}
    for key in sorted(k for k in keys if ".lora_A." in k):
        module = key.split(".lora_A.")[0]
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in keys:
            raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: {key} has no {b_key}")
        pairs[module.removeprefix(PEFT_PREFIX) + ".weight"] = (key, b_key)
    if not pairs:
        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: no lora_A/lora_B tensors (not a LoRA adapter?)")
    return pairs


def merged(weight, a, b, scaling: float):
    """W + (B @ A) * scaling in fp32, back in W's dtype (peft's merge of one linear)."""
    import torch

    return (weight.to(torch.float32) + (b.to(torch.float32) @ a.to(torch.float32)) * scaling).to(weight.dtype)


def _tokenizer(adapter_dir: Path, base_dir: Path):
    from transformers import AutoTokenizer

    for folder in (adapter_dir, base_dir):
        if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return AutoTokenizer.from_pretrained(folder)
    return None


def merge_lora(base: str, adapter: str, out: str, max_shard_bytes: int | None = None) -> Path:
    """Write base + adapter merged at `out` (module doc); returns the output folder."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from raytune_llama.engine.export import DEFAULT_MAX_SHARD_BYTES, _finish, _ShardWriter
    from raytune_llama.engine.hf_cache import resolve_pretrained
    from raytune_llama.engine.parallel.sharded_load import safetensors_index

    base_dir, adapter_dir, final = Path(resolve_pretrained(base)), Path(adapter), Path(out)
    if not (adapter_dir / ADAPTER_CONFIG).is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"--adapter {adapter_dir}: needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                                f"(peft's format, what a train.lora run exports)")
    index = safetensors_index(str(base_dir))
    if not index:
        raise FileNotFoundError(f"--base {base_dir}: no *.safetensors files")
    scaling = adapter_scaling(json.loads((adapter_dir / ADAPTER_CONFIG).read_text()), adapter_dir)
    pairs = adapter_pairs(adapter_dir)
    missing = sorted(set(pairs) - set(index))
    if missing:
        raise ValueError(f"--adapter {adapter_dir} adapts {missing[:3]} ({len(missing)} weights) that the base "
                         f"{base_dir} does not have: the adapter was trained on another model")
    tmp = final.parent / f".{final.name}.tmp-merge"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = _ShardWriter(tmp, "part", max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    with safe_open(adapter_dir / ADAPTER_WEIGHTS, framework="pt") as lora:
        for name, file in sorted(index.items(), key=lambda kv: (kv[1], kv[0])):
            with safe_open(file, framework="pt") as f:  # one tensor at a time (sharded_load: per-tensor opens)
                tensor = f.get_tensor(name)
            if name in pairs:
                a_key, b_key = pairs[name]
                tensor = merged(tensor, lora.get_tensor(a_key), lora.get_tensor(b_key), scaling)
            writer.add(name, tensor)
            del tensor
    writer.flush()
    _finish(tmp, final, writer.files, AutoConfig.from_pretrained(base_dir), _tokenizer(adapter_dir, base_dir), None)
    return final


def merge_run_adapter(export_path: str | Path, max_shard_bytes: int | None = None) -> Path:
    """`finetune --merge`: the adapter a LoRA run exported, merged into its base model (named in
    adapter_config.json) at `{export}-merged`."""
    adapter = Path(export_path)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    return merge_lora(config["base_model_name_or_path"], str(adapter), f"{adapter}-merged", max_shard_bytes)
