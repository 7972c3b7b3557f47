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

    # -- what the plan means for the engine: decided here only ------------------------------
    @property
    def data_parallel_wrapper(self) -> str:
        """How the model is wrapped for data parallelism (docs/parallel_engine.md):
        deepspeed (a DeepSpeed ZeRO engine) | none (dp == 1) | ddp (torch DDP: replicas without
        tp or pp) | fsdp_replicate (FSDP2 `replicate`: zero_stage 0 with tp or pp, whose DTensor
        parameters and pipeline hooks DDP does not handle) | fsdp_shard (FSDP2 `fully_shard`,
        ZeRO 1-3 over dp_shard; HSDP when dp_replicate > 1)."""
        if self.backend == "deepspeed":
            return "deepspeed"
        if self.dp == 1:
            return "none"
        if self.zero_stage == 0:
            return "ddp" if self.tp == 1 and self.pp == 1 else "fsdp_replicate"
        return "fsdp_shard"

    @property
    def uses_fsdp(self) -> bool:
        """FSDP2 wraps the model (its MixedPrecisionPolicy does the casting, not autocast)."""
        return self.data_parallel_wrapper in ("fsdp_replicate", "fsdp_shard")

    @property
    def autocasts(self) -> bool:
        """With mixed precision, the engine runs forward under torch.autocast: torch layouts that
        FSDP2 does not wrap (DeepSpeed and FSDP2 cast the parameters themselves)."""
        return self.backend == "torch" and not self.uses_fsdp

    @property
    def syncs_gradients_once(self) -> bool:
        """Gradients are reduced once per step, after the last micro-batch (DDP replicas and
        ZeRO-1, which accumulates unsharded); ZeRO-2/3 reduce-scatter every micro-batch."""
        return self.data_parallel_wrapper in ("ddp", "fsdp_replicate") or (
            self.data_parallel_wrapper == "fsdp_shard" and self.zero_stage <= 1)

    @property
    def shards_model_state(self) -> bool:
        """No rank holds the whole model state: ZeRO over dp_shard > 1, tensor or pipeline parallel."""
        return (self.zero_stage >= 1 and self.dp_shard > 1) or self.tp > 1 or self.pp > 1

    @property
    def loads_sharded(self) -> bool:
        """Every rank reads only the weights it keeps from the checkpoint files; otherwise one rank
        reads them and the wrapper broadcasts at construction (DDP; DeepSpeed ZeRO-1/2)."""
        wrapper = self.data_parallel_wrapper
        return not (wrapper == "ddp" or (wrapper == "deepspeed" and self.zero_stage != 3))

    @property
    def checkpoint_format(self) -> str:
        """What checkpoint.format 'auto' writes: sharded (each rank its own shards) where the torch
        backend shards the model state, else full (one process, DDP replicas, DeepSpeed, whose
        state is assembled whole anyway)."""
        return "sharded" if self.backend == "torch" and self.shards_model_state else "full"

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
