"""Model + optimizer state of a ParallelEngine for checkpointing.

Torch backend: torch.distributed.checkpoint.state_dict (`get_state_dict` / `set_state_dict`)
on each stage module this rank holds. FQNs are the HF names (wrapper prefixes stripped), so
one DCP checkpoint loads into any other layout. `full=False` gives DTensor shards (feed to
`torch.distributed.checkpoint.save/load`); `full=True` gathers the dp/tp shards into plain
CPU tensors on EVERY rank (export / small models / tests: it costs a full copy per rank;
DCP's own rank-0-only gather would drop the keys of pipeline stages not on global rank 0). With pipeline parallel each pp rank holds only its stages' keys
(disjoint sets; merge them for a whole-model export).
DeepSpeed backend: full model weights only (ZeRO shards gathered); its optimizer state goes
through DeepSpeed's own `save_checkpoint` / `load_checkpoint`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from . import deepspeed_backend as ds


def _options(full: bool, strict: bool = True) -> StateDictOptions:
    return StateDictOptions(full_state_dict=full, cpu_offload=False, strict=strict)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _container(engine):
    # DCP's helpers take one module that covers the optimizer's params. A rank with several
    # (interleaved) stages gets an nn.ModuleList over them; its "<i>." key prefix is
    # stripped/added below so keys stay HF FQNs (stages hold disjoint parameters).
    if len(engine.modules) == 1:
        return engine.modules[0]
    return nn.ModuleList(engine.modules)


def _strip(key: str, multi: bool) -> str:
    return key.split(".", 1)[1] if multi else key


def _rename_optim(optim_state: dict, fn) -> dict:
    return {
        "state": {fn(k): v for k, v in optim_state.get("state", {}).items()},
        "param_groups": [{**g, "params": [fn(p) for p in g["params"]]} for g in optim_state.get("param_groups", [])],
    }


def get_engine_state(engine, full: bool):
    """(model_state, optimizer_state) of this rank; see the module docstring."""
    if engine.ds_engine is not None:
        return ds.gathered_model_state_dict(engine.ds_engine), None
    multi = len(engine.modules) > 1
    ms, os_ = get_state_dict(_container(engine), engine.optimizer, options=_options(full))
    model_state = {_strip(k, multi): v for k, v in ms.items()}
    optim_state = _rename_optim(os_, lambda k: _strip(k, multi)) if multi else os_
    if full:
        return _to_cpu(model_state), _to_cpu(optim_state)
    return model_state, optim_state


def set_engine_state(engine, model_state, optim_state, full: bool) -> None:
    """Load `get_engine_state` output (keys of other pipeline stages are ignored)."""
    if engine.ds_engine is not None:
        if optim_state is not None:
            raise ValueError("backend 'deepspeed' restores optimizer state only via its own load_checkpoint")
        ds.load_model_state_dict(engine.ds_engine, model_state)
        return
    multi = len(engine.modules) > 1
    owner: dict[str, str] = {}  # HF FQN -> key inside the container
    for i, stage in enumerate(engine.stages):
        for k in stage.state_dict().keys():
            k = k.replace("_checkpoint_wrapped_module.", "")
            owner[k] = f"{i}.{k}" if multi else k
    model_state = {owner[k]: v for k, v in model_state.items() if k in owner}
    container = _container(engine)
    if optim_state is None:
        set_model_state_dict(container, model_state, options=_options(full))
        return
    optim_state = _rename_optim(optim_state, lambda k: owner.get(k, k))
    mine = set(owner.values())
    optim_state["state"] = {k: v for k, v in optim_state["state"].items() if k in mine}
    # A checkpoint merged from every pipeline stage lists other stages' params in its groups.
    optim_state["param_groups"] = [{**g, "params": [p for p in g["params"] if p in mine]}
                                   for g in optim_state["param_groups"]]
    set_state_dict(container, engine.optimizer, model_state_dict=model_state,
                   optim_state_dict=optim_state, options=_options(full))
