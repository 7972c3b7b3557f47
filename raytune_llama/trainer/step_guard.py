"""The Ray side of bounded steps (README, "Fault tolerance and elasticity", hangs): a StepWatchdog
per worker, configured from run.collective_timeout_s / run.step_timeout_s, whose stall report goes
to the run's progress board, so that the driver prints which rank stalled in which step and the run
summary lists it."""
from __future__ import annotations

import ray

from raytune_llama.config import Config
from raytune_llama.engine.step_watchdog import StepWatchdog
from raytune_llama.trainer.run_events import StallEvent, to_record

BOARD_TIMEOUT_S = 5.0
"""How long a stalling worker waits for the progress board to take its report."""


def stall_record(rank: int, step: int, waited_s: float, bound_s: float, where: str | None = None) -> dict:
    """The progress-board record of a stall (run_events.StallEvent); `where` is the innermost
    frame the stalled loop was in."""
    return to_record(StallEvent(rank, step, round(waited_s, 3), round(bound_s, 3), where))


def make_step_watchdog(cfg: Config, rank: int, board=None) -> StepWatchdog:
    """A watchdog for this worker's training loop; a stall is pushed to `board` (if any)."""

    def report(rank: int, step: int, waited_s: float, bound_s: float) -> None:
        if board is not None:
            record = stall_record(rank, step, waited_s, bound_s, watchdog.stalled_at)
            ray.get(board.push.remote(record), timeout=BOARD_TIMEOUT_S)

    watchdog = StepWatchdog(rank, first_step_timeout_s=cfg.run.collective_timeout_s,
                            step_timeout_s=cfg.run.step_timeout_s, on_stall=report,
                            callback_timeout_s=BOARD_TIMEOUT_S + 1)
    return watchdog


def follows_checkpoint(cfg: Config, steps_done: int) -> bool:
    """Whether step `steps_done` saved a checkpoint: in the step after it, other ranks'
    collectives may wait for a rank still uploading its files (URI storage_path) and a
    background save (checkpoint.async_save) shares the CPUs and storage, so that step keeps the
    long bound."""
    every = cfg.checkpoint.every_steps
    return bool(every) and steps_done > 0 and steps_done % every == 0
