"""AdamW parameter groups and gradient-norm clipping that is correct for any layout:
DTensor gradients (FSDP shards, TP shards) are reduced over their mesh, plain replicated
gradients are counted once, and the per-stage norms are summed over the pipeline axis."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grad


def adamw_param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups: matrices/embeddings decay, 1-D params (norm weights, biases) do not."""
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        # ZeRO-3 parameters built under deepspeed.zero.Init hold an empty 1-D placeholder:
        # decide by the full shape DeepSpeed records.
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(params_with_names, lr: float, weight_decay: float, betas: tuple[float, float],
                eps: float = 1e-8) -> torch.optim.AdamW:
    """torch AdamW over `adamw_param_groups` (foreach kernels; fused where the device has them)."""
    return torch.optim.AdamW(adamw_param_groups(params_with_names, weight_decay), lr=lr, betas=betas, eps=eps)


# torch's own norm and clip kernels, bound at import: the one-line API patches the module-level
# names (engine/one_line.py) so that a user's clip_grad_norm_ covers every rank; these stay torch's.
_torch_total_norm = getattr(clip_grad, "_get_total_norm", torch.nn.utils.get_total_norm)
_torch_clip_with_norm = getattr(clip_grad, "_clip_grads_with_norm_", torch.nn.utils.clip_grads_with_norm_)


def _mesh_key(t: torch.Tensor) -> int:
    return id(t.device_mesh) if isinstance(t, DTensor) else -1


def _group_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    norm = _torch_total_norm(grads, norm_type)
    if isinstance(norm, DTensor):
        # The norm of sharded grads is a partial DTensor: full_tensor() reduces it over the mesh.
        norm = norm.full_tensor()
    return norm.float()


def global_grad_norm(grads: list[torch.Tensor], pp_group=None, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all of `grads` over every rank, as one process holding the whole model would
    compute it: DTensor gradients reduce over their mesh (grouped by mesh: FSDP x TP and TP-only
    parameters can live on different meshes), plain (replicated) gradients count once, and the
    stages of a pipeline combine over `pp_group`. A 0-dim float32 tensor on the grads' device."""
    p = float(norm_type)
    groups: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(_mesh_key(g), []).append(g)
    device = grads[0].device if grads else torch.device("cpu")
    norms = [_group_norm(group, p).to(device) for group in groups.values()]
    if not norms:
        total = torch.zeros((), dtype=torch.float32, device=device)
    elif p == float("inf"):
        total = torch.stack(norms).max()
    else:
        total = torch.stack([n ** p for n in norms]).sum()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        # Each pipeline rank holds different parameters.
        dist.all_reduce(total, op=dist.ReduceOp.MAX if p == float("inf") else dist.ReduceOp.SUM, group=pp_group)
    return total if p == float("inf") else total ** (1.0 / p)


def clip_grads_by_mesh(params: list[nn.Parameter], max_norm: float, total: torch.Tensor) -> None:
    """Scale every gradient by max_norm / (total + 1e-6) when that is below 1 (torch's rule),
    one mesh at a time: torch's foreach kernels refuse DTensors of different meshes (or DTensors
    with plain tensors) in one call."""
    groups: dict[int, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(_mesh_key(p.grad), []).append(p)
    for group in groups.values():
        _torch_clip_with_norm(group, max_norm, total)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float | None, pp_group=None) -> float:
    """Global L2 norm of all gradients across every rank; clip in place if max_norm is set."""
    total = global_grad_norm([p.grad for p in params if p.grad is not None], pp_group)
    if max_norm is not None and max_norm > 0:
        clip_grads_by_mesh(params, max_norm, total)
    return float(total)
