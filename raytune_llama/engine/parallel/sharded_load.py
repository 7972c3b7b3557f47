"""Meta-device construction + sharded loading from safetensors: no rank ever holds the whole
model. Build the HF model on the `meta` device, let `parallelize` cut/shard/wrap it (TP and
FSDP2 both accept meta parameters), then `materialize_and_load` allocates only this rank's
local shards (`to_empty`) and reads exactly those slices from the memory-mapped safetensors
files (`safe_open(...).get_slice`), so each rank reads and holds ~1/(dp_shard*tp*pp) of it.
"""
from __future__ import annotations

import glob
import json
import logging
import os

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

log = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def meta_model(config, model_cls=None) -> nn.Module:
    """An HF causal LM with every parameter on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        if model_cls is not None:
            return model_cls(config)
        return AutoModelForCausalLM.from_config(config)


def clean_fqn(name: str) -> str:
    """Parameter name without wrapper prefixes (checkpoint_wrapper, compile, DDP)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


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


def _reinit_rotary(stage: nn.Module, device: torch.device) -> None:
    # Rotary inv_freq is a non-persistent buffer (not in the checkpoint): rebuild the module.
    body = getattr(stage, "model", None)
    rotary = getattr(body, "rotary_emb", None)
    if rotary is not None:
        with torch.device(device):
            body.rotary_emb = type(rotary)(config=rotary.config)


@torch.no_grad()
def materialize_and_load(stages: list[nn.Module], path: str, device: torch.device) -> int:
    """Allocate this rank's shards of meta `stages` and fill them from safetensors; returns bytes read."""
    from safetensors import safe_open

    index = safetensors_index(path)
    read = 0
    for stage in stages:
        stage.to_empty(device=device)
        _reinit_rotary(stage, device)
        for name, param in stage.named_parameters():
            key = clean_fqn(name)
            if key not in index:
                raise KeyError(f"parameter {key} not found in the safetensors checkpoint at {path}")
            # Open per tensor on purpose: the file is mmapped and every page touched counts
            # as resident until the mapping closes, so a handle kept open for the whole load
            # would make each rank look (and be charged) as if it held most of the file.
            with safe_open(index[key], framework="pt", device="cpu") as f:
                piece = f.get_slice(key)[_local_slices(param)]
            local = param.to_local() if isinstance(param, DTensor) else param
            local.copy_(piece.to(local.dtype))
            read += piece.numel() * piece.element_size()
            del piece
    log.info("sharded load: read %.1f MiB of local shards from %s", read / 2**20, path)
    return read
