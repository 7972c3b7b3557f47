"""AdamW parameter groups and gradient-norm clipping that is correct for any layout:
DTensor gradients (FSDP shards, TP shards) are reduced over their mesh, plain replicated
gradients are counted once, and the per-stage norms are summed over the pipeline axis."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


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


def _sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        # The norm of sharded grads is a Partial DTensor: full_tensor() reduces it over the mesh.
        norm = norm.full_tensor()
    return norm.float() ** 2


def clip_grad_norm(params: list[nn.Parameter], max_norm: float | None, pp_group=None) -> float:
    """Global L2 norm of all gradients across every rank; clip in place if max_norm is set."""
    grads = [p.grad for p in params if p.grad is not None]
    dt = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    # Group DTensor grads by mesh: FSDP x TP params and TP-only params can live on different meshes.
    by_mesh: dict[int, list[torch.Tensor]] = {}
    for g in dt:
        by_mesh.setdefault(id(g.device_mesh), []).append(g)
    total_sq = _sq_norm(plain).to(grads[0].device if grads else "cpu")
    for group in by_mesh.values():
        total_sq = total_sq + _sq_norm(group).to(total_sq.device)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        # Each pipeline rank holds different parameters: sum the squared norms.
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if max_norm is not None and max_norm > 0:
        by_mesh_params: dict[int, list[nn.Parameter]] = {}
        for p in params:
            if p.grad is not None:
                key = id(p.grad.device_mesh) if isinstance(p.grad, DTensor) else -1
                by_mesh_params.setdefault(key, []).append(p)
        for group in by_mesh_params.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return float(total)
