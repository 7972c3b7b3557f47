"""Planner errors: every user-facing failure is a PlanError naming the field, the value and the fix."""
from __future__ import annotations


class PlanError(ValueError):
    """Invalid planner input or an impossible request; the message names field, value and fix."""

    def __init__(self, field: str, value: object, problem: str, fix: str = "") -> None:
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        msg = f"{field}={value!r}: {problem}"
        if fix:
            msg += f"; fix: {fix}"
        super().__init__(msg)


class NoFeasiblePlanError(PlanError):
    """No layout fits on the cluster; carries the smallest cluster that would fit (if found)."""

    def __init__(self, field: str, value: object, problem: str, fix: str = "",
                 smallest_nodes: int | None = None) -> None:
        self.smallest_nodes = smallest_nodes
        super().__init__(field, value, problem, fix)
