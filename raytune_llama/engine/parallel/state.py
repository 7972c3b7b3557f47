"""Model + optimizer state of a ParallelEngine for checkpointing.

Torch backend: torch.distributed.checkpoint.state_dict (`get_state_dict` / `set_state_dict`)
on each stage module this rank holds. FQNs are the HF names (wrapper prefixes stripped), so
one DCP checkpoint loads into any other layout. `full=False` gives DTensor shards (feed to
`torch.distributed.checkpoint.save/load`); `full=True` gathers the dp/tp shards into plain
CPU tensors on EVERY rank (export / small models / tests: it costs a full copy per rank;
DCP's own rank-0-only gather would drop the keys of pipeline stages not on global rank 0). With pipeline parallel each pp rank holds only its stages' keys
(disjoint sets; merge them for a whole-model export).
`full=False` also flattens the optimizer state to one key per parameter and field
("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"), so pipeline stages, whose optimizers hold
different parameters, save and load it without clashing and in any other layout.
DeepSpeed backend: weights and AdamW moments assembled from the ZeRO partitions in the same
torch format (deepspeed_state.py); `full=False` gives the same whole tensors on every rank
(DCP writes each once).
LoRA engines (engine.lora set): the state is the adapters and their optimizer state only (DCP's
ignore_frozen_params); the frozen base is reloaded from the model files, so a checkpoint of Llama 3
70B with r=16 adapters on all seven projections is ~2.5 GB instead of ~850 GB (docs/lora.md).
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

from . import deepspeed_state as ds_state


def _options(full: bool, lora: bool = False) -> StateDictOptions:
    # LoRA: the frozen base is left out; loading is then non-strict (the base keys are absent)
    # and _check_lora_keys checks the adapter keys instead.
    return StateDictOptions(full_state_dict=full, cpu_offload=False, strict=not lora,
                            flatten_optimizer_state_dict=not full, ignore_frozen_params=lora)


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
        model_state, optim_state = ds_state.get_full_state(engine.ds_engine)
        return model_state, (optim_state if full else flatten_optimizer_state(optim_state))
    multi = len(engine.modules) > 1
    ms, os_ = get_state_dict(_container(engine), engine.optimizer, options=_options(full, _has_lora(engine)))
    model_state = {_strip(k, multi): v for k, v in ms.items()}
    if not multi:
        optim_state = os_
    elif full:
        optim_state = _rename_optim(os_, lambda k: _strip(k, multi))
    else:
        optim_state = {_rename_flat(k, lambda fqn: _strip(fqn, multi)): v for k, v in os_.items()}
    if full:
        return _to_cpu(model_state), _to_cpu(optim_state)
    return model_state, optim_state


def set_engine_state(engine, model_state, optim_state, full: bool) -> None:
    """Load `get_engine_state` output (keys of other pipeline stages are ignored)."""
    if engine.ds_engine is not None:
        if optim_state is not None and not full:
            optim_state = unflatten_optimizer_state(optim_state, ds_state.group_names(engine.ds_engine))
        ds_state.set_full_state(engine.ds_engine, model_state, optim_state)
        return
    multi, lora = len(engine.modules) > 1, _has_lora(engine)
    owner: dict[str, str] = {}  # HF FQN -> key inside the container
    for i, stage in enumerate(engine.stages):
        for k in stage.state_dict().keys():
            k = k.replace("_checkpoint_wrapped_module.", "")
            owner[k] = f"{i}.{k}" if multi else k
    if lora:
        _check_lora_keys(engine, model_state)
    model_state = {owner[k]: v for k, v in model_state.items() if k in owner}
    container = _container(engine)
    if optim_state is None:
        set_model_state_dict(container, model_state, options=_options(full, lora))
        return
    if not full:  # flattened: one key per parameter and field
        optim_state = {_rename_flat(k, lambda fqn: owner.get(fqn, fqn)): v for k, v in optim_state.items()}
        set_state_dict(container, engine.optimizer, model_state_dict=model_state,
                       optim_state_dict=optim_state, options=_options(full, lora))
        return
    optim_state = _rename_optim(optim_state, lambda k: owner.get(k, k))
    mine = set(owner.values())
    optim_state["state"] = {k: v for k, v in optim_state["state"].items() if k in mine}
    # A checkpoint merged from every pipeline stage lists other stages' params in its groups.
    optim_state["param_groups"] = [{**g, "params": [p for p in g["params"] if p in mine]}
                                   for g in optim_state["param_groups"]]
    set_state_dict(container, engine.optimizer, model_state_dict=model_state,
                   optim_state_dict=optim_state, options=_options(full, lora))


def _has_lora(engine) -> bool:
    return getattr(engine, "lora", None) is not None


def _check_lora_keys(engine, model_state: dict) -> None:
    """A LoRA engine loads adapters only, and every adapter of its stages must be there: a state
    without them (a full fine-tuning checkpoint, another train.lora.target_modules) is refused."""
    from .lora import is_adapter
    from .param_names import clean_fqn

    mine = {clean_fqn(n) for stage in engine.stages for n, p in stage.named_parameters() if p.requires_grad}
    given = set(model_state)
    missing = sorted(mine - given)
    if missing or not all(is_adapter(k) for k in given):
        raise ValueError(
            f"train.lora: the checkpoint does not hold this run's LoRA adapters ({len(missing)} of {len(mine)} "
            f"missing, e.g. {missing[:2]}; {len(given)} keys given, e.g. {sorted(given)[:2]}): it was written by "
            f"a run with other train.lora settings (target_modules) or without LoRA; resume with the same "
            f"train.lora, or start a new run")


_FLAT_SECTIONS = ("state.", "param_groups.")


def _rename_flat(key: str, fn) -> str:
    """Rename the parameter FQN inside a flattened optimizer key ("state.<fqn>.<field>")."""
    section = next(s for s in _FLAT_SECTIONS if key.startswith(s))
    fqn, field = key[len(section):].rsplit(".", 1)
    return f"{section}{fn(fqn)}.{field}"


def flatten_optimizer_state(optim_state: dict) -> dict:
    """Nested torch optimizer state (keyed by FQN) -> one key per parameter and field, the
    layout torch's flatten_optimizer_state_dict option gives."""
    flat = {}
    for fqn, fields in optim_state.get("state", {}).items():
        for field, value in fields.items():
            flat[f"state.{fqn}.{field}"] = value
    for group in optim_state.get("param_groups", []):
        for fqn in group["params"]:
            for field, value in group.items():
                if field != "params":
                    flat[f"param_groups.{fqn}.{field}"] = value
    return flat


def unflatten_optimizer_state(flat: dict, group_names: list[list[str]]) -> dict:
    """flatten_optimizer_state's inverse for the given AdamW groups (FQNs per group)."""
    state: dict[str, dict] = {}
    group_fields: dict[str, dict] = {}
    for key, value in flat.items():
        section = next(s for s in _FLAT_SECTIONS if key.startswith(s))
        fqn, field = key[len(section):].rsplit(".", 1)
        (state if section == "state." else group_fields).setdefault(fqn, {})[field] = value
    groups = [{**group_fields.get(names[0], {}), "params": list(names)} for names in group_names if names]
    return {"state": state, "param_groups": groups}


def iter_full_tensors(engine, trainable_only: bool = False):
    """(HF name, whole tensor) for every weight and persistent buffer this rank's pipeline
    stage holds, one at a time, in a fixed order: each sharded tensor is all-gathered over
    the ranks that shard it when its turn comes (collective: every rank of the stage iterates
    in step), so no rank ever holds more than one whole tensor at once. trainable_only: the
    parameters that require grad (LoRA: the adapters, under the engine's names)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    if engine.ds_engine is not None:
        yield from ds_state.iter_full_tensors(engine.ds_engine)
        return
    multi = len(engine.modules) > 1
    local = get_model_state_dict(_container(engine), options=StateDictOptions(full_state_dict=False,
                                                                              ignore_frozen_params=trainable_only))
    for key in sorted(local):
        value = local[key]
        full = value.full_tensor() if isinstance(value, DTensor) else value
        yield _strip(key, multi), full.detach()


def is_export_writer(engine) -> bool:
    """Whether this rank writes its stage's tensors in an export: the first rank of each
    pipeline stage (data- and tensor-parallel coordinate 0); rank 0 for DeepSpeed."""
    import torch.distributed as dist

    if engine.ds_engine is not None or engine.mesh is None:
        return not dist.is_initialized() or dist.get_rank() == 0
    return all(engine.mesh.get_local_rank(axis) == 0 for axis in engine.mesh.mesh_dim_names if axis != "pp")
