"""Workload: what one optimizer step must process (global batch x sequence length), the precision
(optimizer = master dtype, compute dtype), what trains (every weight, or LoRA adapters on a frozen
base), the attention mask (causal, or block-diagonal per packed document) and the user's
constraints on the layout."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from raytune_llama.lora_settings import ALL_LINEAR
from raytune_llama.planner.errors import PlanError

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
OPTIMIZERS = {
    # optimizer -> master dtype: the trained weights and the AdamW moments (parallel.master_weights)
    "adamw": "fp32",        # fp32 master weights + fp32 moments; compute in compute_dtype
    "adamw_bf16": "bf16",   # pure bf16: weights, grads and moments all bf16, computed in bf16
}
COMPUTE_DTYPES = ("bf16", "fp32")
ATTENTION_MASKS = ("causal", "documents")
"""causal: SDPA's is_causal kernel; documents: an explicit block-diagonal causal boolean mask
[micro_batch, 1, seq, seq] (data.packing: documents)."""
PACKING_TO_MASK = {"documents": "documents", "naive": "causal", "none": "causal"}
"""data.packing (and `plan --packing`) -> the attention mask the engine runs."""


@dataclass(frozen=True)
class Constraints:
    """User-fixed knobs; None means the planner chooses."""

    tp: int | None = None
    pp: int | None = None
    allow_offload: bool = True
    headroom: float = 0.05
    """Fraction of device memory kept free (e.g. 0.1 keeps 10% unused)."""
    recompute: str | None = None
    backend: str | None = None


@dataclass(frozen=True)
class Workload:
    """One training step's shape."""

    global_batch: int
    """Sequences per optimizer step (kept identical at every world size)."""
    seq_len: int
    optimizer: str = "adamw"
    """adamw (fp32 master weights and moments) | adamw_bf16 (pure bf16 weights, grads and moments)."""
    constraints: Constraints = field(default_factory=Constraints)
    compute_dtype: str = "bf16"
    """Forward/backward dtype: bf16 (accelerators) | fp32 (CPU runs: no autocast)."""
    lora_rank: int = 0
    """LoRA adapter rank (train.lora.r); 0 = full fine-tuning. With LoRA the base weights are
    frozen in the compute dtype and only the adapters have master weights, gradients and moments."""
    lora_targets: tuple[str, ...] = ALL_LINEAR
    """Linear projections of each decoder layer that get adapters (train.lora.target_modules)."""
    attention_mask: str = "causal"
    """causal | documents (block-diagonal causal mask of packed documents, data.packing: documents)."""

    @property
    def lora(self) -> bool:
        """Whether this is a LoRA run (frozen base, trained adapters)."""
        return self.lora_rank > 0

    @property
    def master_bytes(self) -> int:
        """Bytes of one master weight (and of one AdamW moment): 4 for adamw, 2 for adamw_bf16."""
        return DTYPE_BYTES[OPTIMIZERS[self.optimizer]]

    @property
    def compute_bytes(self) -> int:
        """Bytes of one element of the forward/backward (activations, logits, gathered weights)."""
        return DTYPE_BYTES[self.compute_dtype]


def _pos_int(field_name: str, value: Any, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(field_name, value, "must be a positive integer", f"pass {flag} N with N >= 1")
    return value


def make_workload(global_batch: int, seq_len: int, optimizer: str = "adamw", tp: int | None = None,
                  pp: int | None = None, allow_offload: bool = True, headroom: float = 0.05,
                  recompute: str | None = None, backend: str | None = None,
                  compute_dtype: str = "bf16", lora_rank: int = 0,
                  lora_targets: "str | Sequence[str] | None" = None,
                  attention_mask: str = "causal") -> Workload:
    """Validate and build a Workload; every error names the flag to fix."""
    _pos_int("global_batch", global_batch, "--global-batch")
    _pos_int("seq_len", seq_len, "--seq-len")
    if tp is not None:
        _pos_int("tp", tp, "--tp")
    if pp is not None:
        _pos_int("pp", pp, "--pp")
    aliases = {"adamw_mixed": "adamw", "mixed": "adamw", "bf16": "adamw_bf16", "pure_bf16": "adamw_bf16"}
    optimizer = aliases.get(optimizer, optimizer)
    if optimizer not in OPTIMIZERS:
        raise PlanError("optimizer", optimizer, "unknown optimizer", f"use one of {sorted(OPTIMIZERS)}")
    dtype_aliases = {"bfloat16": "bf16", "float32": "fp32"}
    if isinstance(compute_dtype, str):
        compute_dtype = dtype_aliases.get(compute_dtype, compute_dtype)
    if compute_dtype not in COMPUTE_DTYPES:
        raise PlanError("compute_dtype", compute_dtype, "unknown compute dtype",
                        "pass --compute-dtype bf16 (accelerators) or --compute-dtype fp32 (CPU runs)")
    if OPTIMIZERS[optimizer] == "bf16" and compute_dtype != "bf16":
        raise PlanError("compute_dtype", compute_dtype, "pure bf16 weights (optimizer adamw_bf16) compute in bf16",
                        "pass --compute-dtype bf16, or --optimizer adamw for fp32 master weights")
    if not isinstance(headroom, (int, float)) or not 0 <= headroom < 0.9:
        raise PlanError("headroom", headroom, "must be a fraction in [0, 0.9)", "pass --headroom 0.1 for 10%")
    if recompute is not None and recompute not in ("none", "selective", "full"):
        raise PlanError("recompute", recompute, "unknown mode", "use none | selective | full")
    if backend is not None and backend not in ("torch", "deepspeed"):
        raise PlanError("backend", backend, "unknown backend", "use torch | deepspeed")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise PlanError("lora_rank", lora_rank, "must be an integer >= 0 (0: full fine-tuning)",
                        "pass --lora-rank 16 (train.lora.r), or leave it out for full fine-tuning")
    targets = _lora_targets(lora_targets)
    if lora_rank and backend == "deepspeed":
        raise PlanError("backend", backend, "the engine runs LoRA (train.lora) on the torch backend only",
                        "pass --backend torch (or leave --backend out) with --lora-rank")
    if attention_mask not in ATTENTION_MASKS:
        raise PlanError("attention_mask", attention_mask, "unknown attention mask",
                        "use causal | documents (plan --packing documents|naive|none)")
    return Workload(global_batch, seq_len, optimizer,
                    Constraints(tp, pp, bool(allow_offload), float(headroom), recompute, backend), compute_dtype,
                    lora_rank, targets, attention_mask)


def _lora_targets(value: "str | Sequence[str] | None") -> tuple[str, ...]:
    """Targets as a tuple in ALL_LINEAR order (a comma-separated string is accepted)."""
    if value is None:
        return ALL_LINEAR
    names = [t.strip() for t in value.split(",")] if isinstance(value, str) else list(value)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise PlanError("lora_targets", value, "must name at least one linear projection",
                        f"pass --lora-targets {','.join(ALL_LINEAR)} (or a subset)")
    unknown = sorted(set(names) - set(ALL_LINEAR))
    if unknown:
        raise PlanError("lora_targets", value, f"{unknown} are not linear layers of a Llama decoder layer",
                        f"choose from {','.join(ALL_LINEAR)}")
    return tuple(t for t in ALL_LINEAR if t in names)


def as_workload(workload: "Workload | Mapping[str, Any] | None" = None, **kwargs: Any) -> Workload:
    """Accept a Workload, a dict of make_workload kwargs, or the kwargs themselves."""
    if isinstance(workload, Workload):
        return workload
    params = dict(workload or {})
    params.update(kwargs)
    if "global_batch" not in params or "seq_len" not in params:
        raise PlanError("workload", sorted(params), "needs global_batch and seq_len",
                        "pass workload={'global_batch': 512, 'seq_len': 1024}")
    return make_workload(**params)
