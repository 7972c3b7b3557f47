"""Workload: what one optimizer step must process (global batch x sequence length), the optimizer,
and the user's constraints on the layout."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from raytune_llama.planner.errors import PlanError

OPTIMIZERS = {
    # bytes per parameter: (weights, grads, optimizer states incl. fp32 master)
    "adamw": (2, 2, 12),        # bf16 weights+grads, fp32 master/m/v (mixed precision)
    "adamw_bf16": (2, 2, 4),    # pure bf16: weights, grads, m, v all bf16
}


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
    """adamw (mixed precision, 16 B/param) | adamw_bf16 (pure bf16, 8 B/param)."""
    constraints: Constraints = field(default_factory=Constraints)

    @property
    def bytes_per_param(self) -> tuple[int, int, int]:
        """(weights, grads, optimizer) bytes per parameter."""
        return OPTIMIZERS[self.optimizer]


def _pos_int(field_name: str, value: Any, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(field_name, value, "must be a positive integer", f"pass {flag} N with N >= 1")
    return value


def make_workload(global_batch: int, seq_len: int, optimizer: str = "adamw", tp: int | None = None,
                  pp: int | None = None, allow_offload: bool = True, headroom: float = 0.05,
                  recompute: str | None = None, backend: str | None = None) -> Workload:
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
    if not isinstance(headroom, (int, float)) or not 0 <= headroom < 0.9:
        raise PlanError("headroom", headroom, "must be a fraction in [0, 0.9)", "pass --headroom 0.1 for 10%")
    if recompute is not None and recompute not in ("none", "selective", "full"):
        raise PlanError("recompute", recompute, "unknown mode", "use none | selective | full")
    if backend is not None and backend not in ("torch", "deepspeed"):
        raise PlanError("backend", backend, "unknown backend", "use torch | deepspeed")
    return Workload(global_batch, seq_len, optimizer,
                    Constraints(tp, pp, bool(allow_offload), float(headroom), recompute, backend))


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
