"""Meta-device construction + sharded loading from safetensors: no rank ever holds the whole
model. Build the HF model on the `meta` device, let `parallelize` cut/shard/wrap it (TP and
FSDP2 both accept meta parameters), then `materialize_and_load` allocates only this rank's
local shards (`to_empty`) and reads exactly those slices from the memory-mapped safetensors
files (`safe_open(...).get_slice`), so each rank reads and holds ~1/(dp_shard*tp*pp) of it.
LoRA adapters (engine/parallel/lora.py) are not in the files: their slices are copied from the
whole-model initial values held in memory, and a LoRA-wrapped linear's base weight
(`<module>.base_layer.weight`) is read from the checkpoint's `<module>.weight`.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .param_names import clean_fqn, hf_name

log = logging.getLogger(__name__)

def meta_model(config, model_cls=None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An HF causal LM with every parameter on the meta device (no memory used), in `dtype`
    (the master dtype: fp32 by default, not the dtype the checkpoint's config declares)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        if model_cls is not None:
            return model_cls(config).to(dtype)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def safetensors_index(path: str) -> dict[str, str]:
    """Map tensor name -> file for a safetensors file or a folder (with or without an index json)."""
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: path for k in f.keys()}
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    out: dict[str, str] = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(safetensors_index(file))
    return out


def _local_slices(t: torch.Tensor) -> tuple[slice, ...]:
    # Which rectangle of the full tensor this rank owns (DTensor: from mesh + placements).
    if not isinstance(t, DTensor):
        return tuple(slice(0, n) for n in t.shape)
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def reinit_rotary(stage: nn.Module, device: torch.device) -> None:
    """Rebuild the rotary embedding on `device`: its inv_freq is a non-persistent buffer (not in
    the checkpoint), left empty by to_empty."""
    body = getattr(stage, "model", None)
    rotary = getattr(body, "rotary_emb", None)
    if rotary is not None:
        with torch.device(device):
            body.rotary_emb = type(rotary)(config=rotary.config)


def _aliases(stage: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    # Tied weights (e.g. lm_head.weight is embed_tokens.weight): to_empty gives every
    # occurrence a tensor of its own, so record (module, name) pairs to tie again afterwards.
    first: dict[int, tuple[nn.Module, str]] = {}
    out = []
    for module in stage.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in first:
                out.append((module, name, *first[id(param)]))
            else:
                first[id(param)] = (module, name)
    return out


def _read_into(local: torch.Tensor, index: dict[str, str], key: str, slices: tuple[slice, ...], path: str) -> int:
    """Copy the `slices` rectangle of tensor `key` (cast to local's dtype) into local; bytes read."""
    from safetensors import safe_open

    if key not in index:
        raise KeyError(f"parameter {key} not found in the safetensors checkpoint at {path}: its config.json "
                       f"and its weights disagree (model_type, num_hidden_layers, tie_word_embeddings?); "
                       f"re-save the model with save_pretrained")
    # Open per tensor on purpose: the file is mmapped and every page touched counts as
    # resident until the mapping closes, so a handle kept open for the whole load would make
    # each rank look (and be charged) as if it held most of the file.
    with safe_open(index[key], framework="pt", device="cpu") as f:
        piece = f.get_slice(key)[slices]
    local.copy_(piece)  # casts in place: no temporary in the target dtype
    return piece.numel() * piece.element_size()


@torch.no_grad()
def materialize_and_load(stages: list[nn.Module], path: str, device: torch.device, read_weights: bool = True,
                         adapters: dict[str, torch.Tensor] | None = None) -> int:
    """Allocate this rank's shards of meta `stages` and fill them from safetensors; returns bytes
    read. read_weights=False only allocates: for whole replicas that the wrapper then broadcasts
    from one rank (DDP, DeepSpeed ZeRO-1/2), so that one rank, not every rank, reads the files.
    `adapters`: whole initial LoRA tensors by name (lora.initial_adapters), sliced likewise."""
    index = safetensors_index(path)
    adapters = adapters or {}
    read = 0
    for stage in stages:
        tied = _aliases(stage)
        stage.to_empty(device=device)
        for module, name, owner, owner_name in tied:
            setattr(module, name, getattr(owner, owner_name))
        reinit_rotary(stage, device)
        for name, param in stage.named_parameters() if read_weights else ():
            local = param.to_local() if isinstance(param, DTensor) else param
            key = clean_fqn(name)
            if key in adapters:
                local.copy_(adapters[key][_local_slices(param)])
            else:
                read += _read_into(local, index, hf_name(key), _local_slices(param), path)
    log.info("sharded load: read %.1f MiB of local shards from %s", read / 2**20, path)
    return read


@torch.no_grad()
def load_flat_partitions(named_partitions, path: str) -> int:
    """Fill flat 1-D partitions of full tensors from safetensors, each rank reading only the
    rows that cover its range: `named_partitions` yields (name, full shape, start, partition)
    where partition holds elements [start, start + partition.numel()) of the flattened tensor
    (the tail past the tensor's end, alignment padding, is zeroed). Returns bytes read."""
    index = safetensors_index(path)
    read = 0
    for name, shape, start, partition in named_partitions:
        numel = math.prod(shape)
        end = min(start + partition.numel(), numel)
        partition.zero_()
        if start >= end:
            continue
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        first_row, last_row = start // row, -(-end // row)
        rows = torch.empty((last_row - first_row, *shape[1:]), dtype=partition.dtype, device=partition.device)
        read += _read_into(rows, index, clean_fqn(name), (slice(first_row, last_row),), path)
        offset = start - first_row * row
        partition[: end - start].copy_(rows.reshape(-1)[offset: offset + end - start])
        del rows
    log.info("partitioned load: read %.1f MiB from %s", read / 2**20, path)
    return read
