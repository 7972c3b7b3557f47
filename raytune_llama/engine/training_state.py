"""Whole-model training state of a ParallelEngine, in HF parameter names, whatever the layout:
gathered on rank 0 for a checkpoint or an export, and loaded back into any other layout
(another world size, FSDP → TP, PP → FSDP, ...) because every key is layout-free."""
from __future__ import annotations

import torch.distributed as dist


def _merge_optimizer(parts: list[dict]) -> dict:
    """One optimizer state dict from pipeline stages holding disjoint parameters."""
    merged = {"state": {}, "param_groups": []}
    for part in parts:
        merged["state"].update(part.get("state", {}))
        for i, group in enumerate(part.get("param_groups", [])):
            if i == len(merged["param_groups"]):
                merged["param_groups"].append({**group, "params": list(group["params"])})
            else:
                merged["param_groups"][i]["params"] += [p for p in group["params"]
                                                        if p not in merged["param_groups"][i]["params"]]
    return merged


def gather_full_state(engine) -> tuple[dict | None, dict | None]:
    """(model_state, optimizer_state) of the whole model on global rank 0, (None, None)
    elsewhere. Optimizer state is None for backends that cannot export it (DeepSpeed)."""
    model_state, optim_state = engine.get_state(full=True)
    if engine.plan.pp == 1 or not dist.is_initialized():
        return (model_state, optim_state) if _is_rank0() else (None, None)
    # Pipeline: each stage's keys live on that stage's ranks; rank 0 merges them.
    parts = [None] * dist.get_world_size() if _is_rank0() else None
    dist.gather_object((model_state, optim_state), parts, dst=0)
    if not _is_rank0():
        return None, None
    merged_model = {}
    for ms, _ in parts:
        merged_model.update(ms)
    optims = [os_ for _, os_ in parts if os_ is not None]
    return merged_model, (_merge_optimizer(optims) if optims else None)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
