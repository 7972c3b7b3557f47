"""Bounded training steps: a watchdog that a training loop arms around each optimizer step,
so that a rank stuck in a collective (or in anything else) ends its process within a bound
that names the rank and the step, instead of hanging until torch's 30-minute default.

    watchdog = StepWatchdog(rank, first_step_timeout_s=600, on_stall=report)
    while step < stop_at:
        with watchdog.step(step + 1):
            engine.train_step(batch)
    watchdog.close()

Bounds: until a step has completed, a step may take `first_step_timeout_s` (model warm-up,
allocator growth, first collectives). After that each step is bounded by `step_timeout_s`
when given, else automatically by max(auto_floor_s, auto_factor x the slowest step seen),
and never by more than the first bound. A step armed with `relaxed=True` (e.g. the step
after a checkpoint, whose collectives wait for rank 0's upload) gets the first bound again.

On a stall a daemon thread logs an error (rank, step, seconds waited, the loop thread's
stack), calls `on_stall(rank, step, waited_s, bound_s)` for at most `callback_timeout_s`,
and ends the process with `os._exit(STALL_EXIT_CODE)`: a rank blocked inside a gloo/NCCL
call cannot be interrupted by an exception, and ending the process is what lets the
launcher restart the group.

Process groups: inside a step the timeout of every torch.distributed process group is set
to min(first bound, 2 x the step bound), and back to the first bound between steps
(checkpoint and export collectives keep the long bound). This is a backstop for when this
thread cannot run (a C call holding the GIL). With gloo the new timeout applies to every
collective started afterwards: a rank waiting longer raises "Timed out waiting ... ms".
With NCCL each collective takes the timeout current when it is enqueued, and the NCCL
watchdog aborts it. Subgroups (DeviceMesh dimensions) are created with torch's default
timeout (30 minutes for gloo), so the first step also brings them to the first bound.

Pure Python and (optionally) torch.distributed; no Ray."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Optional

log = logging.getLogger(__name__)

STALL_EXIT_CODE = 75
"""Exit status of a process ended by the watchdog (EX_TEMPFAIL: a retry may succeed)."""
AUTO_FLOOR_S = 120.0
"""Smallest automatic bound: data hiccups and GC pauses must not end a healthy run."""
AUTO_FACTOR = 10.0
"""Automatic bound = this many times the slowest step seen (at least AUTO_FLOOR_S)."""
COLLECTIVE_MARGIN = 2.0
"""Process-group timeout inside a step = this many times the step bound: the watchdog's
message (rank and step named) comes first; the collective timeout is the backstop."""

StallCallback = Callable[[int, int, float, float], None]


@dataclass(frozen=True)
class _Armed:
    step: int
    started: float  # StepWatchdog's clock (time.monotonic)
    bound_s: float
    thread_id: int  # the loop thread, whose stack the error shows

    @property
    def deadline(self) -> float:
        return self.started + self.bound_s


def process_groups() -> list:
    """Every torch.distributed process group of this process ([] without torch.distributed,
    before init_process_group, or with a torch that cannot change a group's timeout)."""
    if "torch.distributed" not in sys.modules:  # never imported: no group, and no torch import here
        return []
    try:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d
    except ImportError:
        return []
    if not (dist.is_available() and dist.is_initialized() and hasattr(c10d, "_set_pg_timeout")):
        return []
    world = getattr(c10d, "_world", None)
    return list(getattr(world, "pg_map", {}) or {})


def set_collective_timeout(seconds: float) -> int:
    """Set the timeout of every process group of this process (a local change, no
    collective); returns how many groups took it."""
    groups = process_groups()
    if not groups:
        return 0
    from torch.distributed.distributed_c10d import _set_pg_timeout

    done = 0
    with warnings.catch_warnings():  # a backend other than gloo/NCCL warns on every call: ignore it
        warnings.simplefilter("ignore")
        for group in groups:
            try:
                _set_pg_timeout(timedelta(seconds=seconds), group)
                done += 1
            except (ValueError, RuntimeError, AssertionError) as exc:  # e.g. not a member of that group
                log.debug("cannot set the timeout of process group %s: %s", group, exc)
    return done


def _frame_name(frame) -> Optional[str]:
    """'package/file.py:LINE in function' for a frame (None for no frame)."""
    if frame is None:
        return None
    code = frame.f_code
    path = "/".join(code.co_filename.replace(os.sep, "/").split("/")[-2:])
    return f"{path}:{frame.f_lineno} in {code.co_name}"


class StepWatchdog:
    """Ends this process when a step runs past its bound; see the module docstring."""

    def __init__(self, rank: int, first_step_timeout_s: float, step_timeout_s: Optional[float] = None,
                 on_stall: Optional[StallCallback] = None, *, auto_floor_s: float = AUTO_FLOOR_S,
                 auto_factor: float = AUTO_FACTOR, callback_timeout_s: float = 10.0,
                 exit_code: int = STALL_EXIT_CODE, tighten_process_groups: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        """`clock` (monotonic seconds) times the steps and their deadlines; tests pass a fake one
        so that a loaded machine cannot stretch a step. The watch thread still waits in real time
        between looks at it: with a fake clock that never reaches a deadline it never fires."""
        if first_step_timeout_s <= 0 or (step_timeout_s is not None and step_timeout_s <= 0):
            raise ValueError(f"step bounds must be > 0 seconds (first {first_step_timeout_s}, step {step_timeout_s})")
        self.rank, self.first_step_timeout_s, self.step_timeout_s = rank, float(first_step_timeout_s), step_timeout_s
        self.on_stall, self.callback_timeout_s, self.exit_code = on_stall, callback_timeout_s, exit_code
        self.auto_floor_s, self.auto_factor = auto_floor_s, auto_factor
        self.tighten_process_groups = tighten_process_groups
        self._clock = clock
        self.steps_done = 0
        self._slowest_ordinary: Optional[float] = None  # slowest step that ran under a tightened bound
        self._slowest_relaxed: Optional[float] = None  # slowest first / relaxed step
        self._armed: Optional[_Armed] = None
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._collective_timeout_s: Optional[float] = None  # last value set on the process groups
        self.stalled_at: Optional[str] = None
        """Set before on_stall runs: the innermost frame of the stalled loop thread, e.g.
        'testing/fault_injection.py:131 in stall_if_injected' (a rank waiting for a stalled peer shows
        a torch.distributed frame, or an autograd one for collectives run by backward hooks)."""

    @property
    def bound_s(self) -> float:
        """The bound of the next ordinary step."""
        if self.steps_done == 0:
            return self.first_step_timeout_s
        if self.step_timeout_s is not None:
            return min(float(self.step_timeout_s), self.first_step_timeout_s)
        slowest = self._slowest_ordinary if self._slowest_ordinary is not None else self._slowest_relaxed
        return min(self.first_step_timeout_s, max(self.auto_floor_s, self.auto_factor * (slowest or 0.0)))

    @contextlib.contextmanager
    def step(self, step: int, relaxed: bool = False) -> Iterator[float]:
        """Arm the watchdog for one step (numbered as the loop reports it); yields the bound."""
        relaxed = relaxed or self.steps_done == 0
        bound = self.first_step_timeout_s if relaxed else self.bound_s
        self._set_collective_timeout(min(self.first_step_timeout_s, COLLECTIVE_MARGIN * bound))
        started = self._clock()
        self._arm(_Armed(step, started, bound, threading.get_ident()))
        try:
            yield bound
        finally:
            self._arm(None)
            self._set_collective_timeout(self.first_step_timeout_s)
        took = self._clock() - started  # only a step that completed gets here
        self.steps_done += 1
        if relaxed:
            self._slowest_relaxed = max(self._slowest_relaxed or 0.0, took)
        else:
            self._slowest_ordinary = max(self._slowest_ordinary or 0.0, took)

    def close(self) -> None:
        """Stop the watch thread (the loop is over)."""
        with self._cond:
            self._closed, self._armed = True, None
            self._cond.notify_all()

    def _arm(self, armed: Optional[_Armed]) -> None:
        with self._cond:
            if self._closed:
                return
            self._armed = armed
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="raytune-llama-step-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _set_collective_timeout(self, seconds: float) -> None:
        if self.tighten_process_groups and seconds != self._collective_timeout_s:
            if set_collective_timeout(seconds):
                self._collective_timeout_s = seconds

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._closed:
                    return
                armed = self._armed
                if armed is None:
                    self._cond.wait()
                    continue
                remaining = armed.deadline - self._clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        self._stall(armed)

    def _stall(self, armed: _Armed) -> None:
        waited = self._clock() - armed.started
        frame = sys._current_frames().get(armed.thread_id)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(loop thread not found)\n"
        self.stalled_at = _frame_name(frame)
        log.error("rank %d stalled in step %d: no progress for %.1f s (bound %.1f s); ending this process "
                  "(exit status %d) so that the worker group is restarted. The training loop was at:\n%s",
                  self.rank, armed.step, waited, armed.bound_s, self.exit_code, stack.rstrip())
        if self.on_stall is not None:
            caller = threading.Thread(target=self._call_on_stall, args=(armed.step, waited, armed.bound_s),
                                      name="raytune-llama-stall-report", daemon=True)
            caller.start()
            caller.join(self.callback_timeout_s)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.exit_code)

    def _call_on_stall(self, step: int, waited: float, bound: float) -> None:
        try:
            self.on_stall(self.rank, step, waited, bound)
        except Exception as exc:  # best effort: the process ends either way
            log.error("stall report of rank %d failed: %s", self.rank, exc)
