"""Export the trained model as an HF model directory without ever holding the whole model
in one process: tensors are gathered one at a time (an all-gather over the ranks that shard
it) and written by one rank per pipeline stage into safetensors files of at most
`max_shard_bytes`; rank 0 then names the files as HF does (model.safetensors, or
model-0000i-of-0000n.safetensors + model.safetensors.index.json), adds config.json and the
tokenizer, and renames the finished directory into place. Peak extra memory per rank: one
tensor plus one shard buffer (writers only). A 70B model exports like a 1B one.

Collective: every rank calls `export_model_streaming` with the same arguments. With pipeline
parallel across nodes, the export directory must be on storage every writer sees (the run's
storage path).

A LoRA engine (docs/lora.md) exports its adapter in peft's format instead: adapter_config.json
(peft's LoraConfig, base_model_name_or_path = the model folder), adapter_model.safetensors (peft's
key names, the adapters' training dtype) and the tokenizer, loadable with
`PeftModel.from_pretrained(base_model, out_dir)`; `raytune-llama merge-lora` makes a merged model of
it. Only the adapters are gathered (one at a time), never the frozen base."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from raytune_llama.engine.atomic_files import replace_dir
from raytune_llama.engine.ranks import rank_and_world

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # what HF's save_pretrained uses


def _export_dtype(config) -> torch.dtype | None:
    """The dtype the source checkpoint declares (a bf16 model is exported in bf16); None keeps
    the training dtype."""
    name = getattr(config, "dtype", None)  # transformers 5 reads a config's torch_dtype into dtype
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None


class _ShardWriter:
    """Collects tensors and writes a safetensors file whenever the next one would overflow."""

    def __init__(self, directory: Path, prefix: str, max_bytes: int):
        self.directory, self.prefix, self.max_bytes = directory, prefix, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.files: list[tuple[str, list[str]]] = []  # (file name, keys) in write order

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.bytes + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.detach().to("cpu").contiguous().clone()
        self.bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        name = f"{self.prefix}-{len(self.files):05d}.safetensors"
        save_file(self.buffer, str(self.directory / name), metadata={"format": "pt"})
        self.files.append((name, list(self.buffer)))
        self.buffer, self.bytes = {}, 0


def export_model_streaming(engine, model_path: str, tokenizer, out_dir: str | os.PathLike,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the engine's current weights as an HF model directory at out_dir (see module doc)."""
    from transformers import AutoConfig

    from raytune_llama.engine.parallel.state import iter_full_tensors

    if getattr(engine, "lora", None) is not None:
        return export_adapter_streaming(engine, model_path, tokenizer, out_dir)
    rank, world = rank_and_world()
    final = Path(out_dir)
    config = AutoConfig.from_pretrained(model_path)
    dtype = _export_dtype(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def tensors():
        for name, tensor in iter_full_tensors(engine):  # collective per tensor
            if not (tied and name == "lm_head.weight"):
                yield name, (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)

    tmp, files = _write_parts(engine, final, tensors(), max_shard_bytes)
    if rank == 0:
        _finish(tmp, final, files, config, tokenizer, dtype)
    if world > 1:
        dist.barrier()
    return final


def _write_parts(engine, final: Path, tensors, max_shard_bytes: int) -> tuple[Path, list]:
    """Collective: the export's temporary folder next to `final`, and every writer's part files
    (name, keys) gathered on rank 0 (other ranks: []). `tensors` yields (name, tensor) on every
    rank (each step a collective); the export writers (one rank per pipeline stage) write theirs."""
    from raytune_llama.engine.parallel.state import is_export_writer

    rank, world = rank_and_world()
    tmp = final.parent / f".{final.name}.tmp-export"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    writer = _ShardWriter(tmp, f"part-r{rank:05d}", max_shard_bytes) if is_export_writer(engine) else None
    for name, tensor in tensors:
        if writer is not None:
            writer.add(name, tensor)
        del tensor
    if writer is not None:
        writer.flush()
    files = writer.files if writer is not None else []
    parts = [None] * world if rank == 0 else None
    if world > 1:
        dist.gather_object(files, parts, dst=0)
    else:
        parts = [files]
    return tmp, ([f for part in parts for f in part] if rank == 0 else [])


def _finish(tmp: Path, final: Path, files: list[tuple[str, list[str]]], config, tokenizer, dtype) -> None:
    """HF names for the parts, the index, config.json and tokenizer; then rename into place."""
    if len(files) == 1:
        os.replace(tmp / files[0][0], tmp / "model.safetensors")
    else:
        weight_map, total = {}, 0
        for i, (name, keys) in enumerate(files, start=1):
            new = f"model-{i:05d}-of-{len(files):05d}.safetensors"
            os.replace(tmp / name, tmp / new)
            weight_map.update({k: new for k in keys})
        for name in set(weight_map.values()):
            total += (tmp / name).stat().st_size
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(tmp)
    if tokenizer is not None:  # the one-line API's save_pretrained saves the model only, as HF's does
        tokenizer.save_pretrained(tmp)
    replace_dir(tmp, final)  # the previous export stays until the new one is in place


ADAPTER_FILE = "adapter_model.safetensors"


def export_adapter_streaming(engine, model_path: str, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Collective: write a LoRA engine's adapters in peft's format at out_dir (module doc). The
    adapters are gathered one at a time and written by one rank per pipeline stage; rank 0 joins
    the stages' parts into the one adapter_model.safetensors peft reads."""
    from raytune_llama.engine.parallel.lora import peft_key
    from raytune_llama.engine.parallel.state import iter_full_tensors

    rank, world = rank_and_world()
    final = Path(out_dir)
    tensors = ((peft_key(name), t) for name, t in iter_full_tensors(engine, trainable_only=True))
    # One part per writer: peft reads a single file, and adapters are small (docs/lora.md).
    tmp, files = _write_parts(engine, final, tensors, 2**62)
    if rank == 0:
        write_peft_adapter(tmp, final, [name for name, _ in files], engine.lora, model_path, tokenizer)
    if world > 1:
        dist.barrier()
    return final


def write_peft_adapter(tmp: Path, final: Path, part_files: list[str], lora, model_path: str, tokenizer) -> None:
    """Join the parts in `tmp` into adapter_model.safetensors, add adapter_config.json (peft's
    own LoraConfig.save_pretrained) and the tokenizer, then rename tmp into place."""
    from safetensors.torch import load_file, save_file

    from raytune_llama.engine.parallel.lora import peft_config

    if len(part_files) == 1:
        os.replace(tmp / part_files[0], tmp / ADAPTER_FILE)
    else:
        tensors: dict[str, torch.Tensor] = {}
        for name in part_files:
            tensors.update(load_file(tmp / name))
            (tmp / name).unlink()
        save_file(dict(sorted(tensors.items())), str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
    peft_config(lora, base_model=str(model_path)).save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    replace_dir(tmp, final)
