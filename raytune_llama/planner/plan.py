"""ParallelPlan: the layout contract shared by the planner (which produces it) and the
engine (which applies it). Pure Python; serialisable to/from a plain dict."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
RECOMPUTE_MODES = ("none", "selective", "full")
BACKENDS = ("torch", "deepspeed")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class ParallelPlan:
    """One parallel layout. Degrees multiply to the world size:
    dp_replicate * dp_shard * tp * pp == world_size."""

    dp_replicate: int = 1
    """Data-parallel replicas (plain DDP / ZeRO-0 replication axis)."""
    dp_shard: int = 1
    """Data-parallel degree over which parameters/grads/optimizer state are sharded."""
    zero_stage: int = 0
    """0 = replicated (DDP); 1/2/3 = ZeRO stage over the dp_shard axis (3 == FSDP full shard)."""
    tp: int = 1
    """Tensor-parallel degree (inside one node)."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence on the TP axis."""
    pp: int = 1
    """Pipeline stages."""
    pp_schedule: str = "1f1b"
    """gpipe | 1f1b | interleaved_1f1b."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (> 1 only with interleaved_1f1b)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step per data-parallel rank (pipeline: per flush)."""
    recompute: str = "none"
    """Activation recomputation: none | selective | full."""
    offload: bool = False
    """Offload optimizer state to CPU (DeepSpeed)."""
    backend: str = "torch"
    """torch (FSDP2/DTensor/pipelining) | deepspeed (ZeRO)."""

    @property
    def dp(self) -> int:
        """Total data-parallel degree."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        """Number of devices this plan uses."""
        return self.dp * self.tp * self.pp

    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.dp * self.micro_batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ParallelPlan":
        """Build from a dict; unknown keys are an error naming the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown plan field(s) {unknown}; known fields are {sorted(known)}"
            )
        return cls(**data)

    def describe(self) -> str:
        """Compact one-line description, e.g. 'dp_shard=8 zero=3 tp=1 pp=8(1f1b) mbs=1 ga=8 recompute=full'."""
        parts = []
        if self.dp_replicate > 1:
            parts.append(f"dp_replicate={self.dp_replicate}")
        if self.dp_shard > 1:
            parts.append(f"dp_shard={self.dp_shard}")
        parts.append(f"zero={self.zero_stage}")
        parts.append(f"tp={self.tp}{'+sp' if self.sequence_parallel else ''}")
        sched = self.pp_schedule + (f"x{self.virtual_stages}" if self.virtual_stages > 1 else "")
        parts.append(f"pp={self.pp}({sched})" if self.pp > 1 else "pp=1")
        parts.append(f"mbs={self.micro_batch_size} ga={self.grad_accum}")
        parts.append(f"recompute={self.recompute}")
        if self.offload:
            parts.append("offload=cpu")
        parts.append(f"backend={self.backend}")
        return " ".join(parts)
