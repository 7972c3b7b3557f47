"""`train.lora` of the config, checked and with its defaults: the one description of a LoRA run
that the config checks, the planner's workload and the engine all read (no torch here).

    settings = LoraSettings.from_dict({"r": 16, "alpha": 32})
    settings.target_modules   # the decoder's seven linear projections unless given
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear projection of a Llama decoder layer (the default targets: QLoRA's finding that
adapting all of them matches full fine-tuning better than attention alone)."""

KEYS = ("r", "alpha", "dropout", "target_modules")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scaling numerator: the adapter's output is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Names of the linear modules (last name component) that get adapters."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_dict(cls, values: Optional[dict]) -> Optional["LoraSettings"]:
        """None for None (no LoRA); raises ValueError listing every problem otherwise."""
        if values is None:
            return None
        problems = lora_problems(values)
        if problems:
            raise ValueError("; ".join(problems))
        kwargs: dict[str, Any] = dict(values)
        if "target_modules" in kwargs:
            kwargs["target_modules"] = tuple(kwargs["target_modules"])
        if "alpha" in kwargs:
            kwargs["alpha"] = float(kwargs["alpha"])
        if "dropout" in kwargs:
            kwargs["dropout"] = float(kwargs["dropout"])
        return cls(**kwargs)


def lora_problems(values: Any) -> list[str]:
    """Every problem of a train.lora value, each naming the key, the value and the fix."""
    if values is None:
        return []
    if not isinstance(values, dict):
        return [f"train.lora: expected a mapping such as {{r: 16, alpha: 32}}, got {values!r}"]
    problems = [f"train.lora.{k}: unknown key (value {v!r}); known keys are {list(KEYS)}"
                for k, v in values.items() if k not in KEYS]
    r = values.get("r", LoraSettings.r)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"train.lora.r: {r!r} must be a positive integer (the adapter rank, e.g. 16)")
    alpha = values.get("alpha", LoraSettings.alpha)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        problems.append(f"train.lora.alpha: {alpha!r} must be a number > 0 (commonly 2 * r)")
    dropout = values.get("dropout", LoraSettings.dropout)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"train.lora.dropout: {dropout!r} must be in [0, 1)")
    targets = values.get("target_modules", list(ALL_LINEAR))
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
        problems.append(f"train.lora.target_modules: {targets!r} must be a non-empty list of module names, "
                        f"e.g. {list(ALL_LINEAR)}")
    else:
        unknown = sorted(set(targets) - set(ALL_LINEAR))
        if unknown:
            problems.append(f"train.lora.target_modules: {unknown} are not linear layers of a Llama decoder layer; "
                            f"choose from {list(ALL_LINEAR)}")
    return problems
