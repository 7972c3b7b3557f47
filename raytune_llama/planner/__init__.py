"""Pure-Python parallelization planner (no torch/ray imports): see docs/planner.md."""
from raytune_llama.planner.api import Estimate, PlanResult, estimate, plan
from raytune_llama.planner.errors import NoFeasiblePlanError, PlanError
from raytune_llama.planner.plan import ParallelPlan

__all__ = ["Estimate", "NoFeasiblePlanError", "ParallelPlan", "PlanError", "PlanResult", "estimate", "plan"]
