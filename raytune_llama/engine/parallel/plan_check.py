"""The engine's legality check: the planner's rules (planner/rules.py), applied to the model the
engine is about to build, so a plan the planner would reject is refused here for the same
reason, before any weight is read or any process group is used."""
from __future__ import annotations

from raytune_llama.planner.model_spec import from_hf_config
from raytune_llama.planner.plan import ParallelPlan
from raytune_llama.planner.rules import layout_violations


def check_plan(plan: ParallelPlan, config=None, lora=None, master_weights: str = "fp32") -> None:
    """Raise one ValueError listing every rule `plan` breaks for this HF model config (None:
    the rules that need no model), LoRA settings (None: full fine-tuning) and master dtype."""
    model = from_hf_config(config.to_dict()) if config is not None else None
    broken = layout_violations(model, plan, lora_dropout=lora.dropout if lora is not None else None,
                               pure_bf16=master_weights == "bf16")
    if broken:
        raise ValueError("; ".join(v.message for v in broken))
