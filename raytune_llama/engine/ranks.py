"""This process's place in the torch.distributed world, and rank 0's word for every rank;
both also work in a single process without a process group."""
from __future__ import annotations

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_rank0(value):
    """Rank 0's value on every rank (a small picklable object; collective)."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_from_all_ranks(value) -> list:
    """Every rank's value, in rank order, on every rank (small picklable objects; collective)."""
    world = rank_and_world()[1]
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out
