"""DeepSpeed ZeRO-1/2/3 training state in the torch format every other layout uses, so a
DeepSpeed run checkpoints and resumes like any layout, at any world size, in any layout
(ZeRO-3 -> FSDP, FSDP -> ZeRO-2, 2 -> 1 ranks, ...) with no offline conversion step.

Weights and AdamW moments are assembled from the ZeRO partitions with DeepSpeed's
`safe_get_full_fp32_param` / `safe_get_full_optimizer_state` (collective over the dp group:
every rank calls them in the same order) and written back with the `safe_set_full_*`
counterparts, which keep only this rank's partition. The result is the torch optimizer
state dict layout keyed by HF parameter names:
    {"state": {fqn: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [{..., "params": [fqn]}]}
The groups are the engine's AdamW groups (decay / no decay) in the same order.
Cost: the assembled state is a full copy on every rank (the same as DeepSpeed's own
consolidated `zero_to_fp32` output), so very large DeepSpeed models checkpoint slower than
torch FSDP layouts, whose shards are saved in place."""
from __future__ import annotations

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps only a partition in .data


def _persistent_buffers(module):
    """(name, buffer) of the buffers a state dict holds (not rotary caches and the like)."""
    persistent = set(module.state_dict().keys())
    return [(name, buf) for name, buf in module.named_buffers() if name in persistent]


def _base_optimizer(ds_engine) -> torch.optim.Optimizer:
    """The torch AdamW DeepSpeed steps on its flat fp32 partitions."""
    return getattr(ds_engine.optimizer, "optimizer", ds_engine.optimizer)


def group_names(ds_engine) -> list[list[str]]:
    """FQNs of each AdamW group (matrices decay, 1-D parameters do not; as adamw_param_groups)."""
    decay, no_decay = [], []
    for name, p in ds_engine.module.named_parameters():
        if p.requires_grad:
            (decay if len(_full_shape(p)) >= 2 else no_decay).append(name)
    return [decay, no_decay] if no_decay else [decay]


def _hyperparams(ds_engine) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in _base_optimizer(ds_engine).param_groups]


def _flat_partitions(ds_engine) -> list[torch.Tensor]:
    """The flat fp32 tensors the base AdamW keeps its state for (this rank's partitions)."""
    zero = ds_engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        flats = getattr(zero, attr, None)
        if flats is not None:
            return [t for t in flats if t is not None]
    return [p for g in _base_optimizer(ds_engine).param_groups for p in g["params"]]


def _step_count(ds_engine) -> float:
    state = _base_optimizer(ds_engine).state
    for flat in _flat_partitions(ds_engine):
        if "step" in state.get(flat, {}):
            return float(state[flat]["step"])
    return 0.0


def get_full_state(ds_engine) -> tuple[dict, dict]:
    """(model_state, optimizer_state): whole fp32 weights and AdamW state on CPU, on every rank
    (zero moments at step 0 before the first step)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    step = _step_count(ds_engine)
    if step > 0:
        _link_moment_views(ds_engine)
    model_state, state = {}, {}
    for name, p in ds_engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        model_state[name] = (full if full is not None else p.detach()).cpu().clone()
        if not p.requires_grad:
            continue
        if step > 0:
            moments = {k: safe_get_full_optimizer_state(p, k).cpu().clone() for k in MOMENTS}
        else:  # before the first step: what a fresh AdamW holds (also the template DCP loads into)
            moments = {k: torch.zeros(_full_shape(p), dtype=torch.float32) for k in MOMENTS}
        state[name] = {"step": torch.tensor(step), **moments}
    for name, buf in _persistent_buffers(ds_engine.module):
        model_state[name] = buf.detach().cpu().clone()
    groups = [{**hp, "params": names} for hp, names in zip(_hyperparams(ds_engine), group_names(ds_engine))]
    return model_state, {"state": state, "param_groups": groups}


def set_full_state(ds_engine, model_state: dict, optim_state: dict | None) -> None:
    """Load whole weights (and, when given, AdamW state) into this rank's ZeRO partitions."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from .deepspeed_backend import load_model_state_dict

    load_model_state_dict(ds_engine, model_state)  # low-precision weights + fp32 master copies
    state = (optim_state or {}).get("state", {})
    if not state:
        return
    missing = [n for n, p in ds_engine.module.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"optimizer state has no entry for {len(missing)} parameter(s), e.g. {missing[:3]}")
    base = _base_optimizer(ds_engine)
    flats = _flat_partitions(ds_engine)
    _ensure_optimizer_state(base, flats)
    _link_moment_views(ds_engine)
    for name, p in ds_engine.module.named_parameters():
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, state[name][key].to(torch.float32), key)
        safe_set_full_fp32_param(p, model_state[name].to(torch.float32))
    step = float(next(iter(state.values()))["step"])
    for s in (base.state[f] for f in flats):
        s["step"] = torch.tensor(step, dtype=s["step"].dtype) if torch.is_tensor(s.get("step")) else step
    for group, saved in zip(base.param_groups, optim_state.get("param_groups", [])):
        group.update({k: v for k, v in saved.items() if k != "params" and k in group})


def _ensure_optimizer_state(base: torch.optim.Optimizer, flats: list[torch.Tensor]) -> None:
    """AdamW creates its state on the first step; DeepSpeed's partitions need it to exist
    before moments can be written into them (zeros, step 0: exactly a fresh AdamW)."""
    for p in flats:
        st = base.state[p]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _link_moment_views(ds_engine) -> None:
    """ZeRO-1/2 map each parameter to its slice of the flat moment tensors once, right after
    the first optimizer step of group 0, before the other groups have any state; with two
    AdamW groups the second group's parameters then have no moments to read or write.
    Map (again) now that every group's state exists."""
    zero = ds_engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def iter_full_tensors(ds_engine):
    """(name, whole fp32 tensor) per parameter, then persistent buffers, one at a time
    (collective over the dp group under ZeRO: every rank iterates in step)."""
    from deepspeed.utils import safe_get_full_fp32_param

    for name, p in ds_engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        yield name, (full if full is not None else p.detach())
    for name, buf in _persistent_buffers(ds_engine.module):
        yield name, buf.detach()
