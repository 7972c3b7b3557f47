"""Live progress on the driver: rank 0 pushes one record per step to a small actor, and a
driver thread prints a line (step, loss, tokens/s, ETA) as records arrive."""
from __future__ import annotations

import sys
import logging
import threading
from typing import Optional

import ray

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Holds per-step records of one run (pushed by rank 0, read by the driver)."""

    def __init__(self):
        self.records: list[dict] = []

    def push(self, record: dict) -> None:
        """Append one step record (or event: start, stall)."""
        self.records.append(record)

    def since(self, index: int) -> list[dict]:
        """Records from position index on."""
        return self.records[index:]


def format_eta(seconds: float) -> str:
    """H:MM:SS."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_progress(rec: dict) -> str | None:
    """One progress line for a step record (or a worker-group start or stall event)."""
    if rec.get("event") == "start":
        return (f"[raytune_llama] worker group started at step {rec['step']} "
                f"on {rec['world_size']} worker(s), layout {rec['layout']}")
    if rec.get("event") in ("data", "checkpoint"):
        return None  # per-rank data audit records and checkpoint records (trackers) are not printed
    if rec.get("event") == "failure":
        return (f"[raytune_llama] worker(s) {rec['ranks']} failed ({'; '.join(rec['errors'])[:300]}): the worker "
                f"group restarts from the latest checkpoint while run.max_failures allows")
    if rec.get("event") == "stall":
        at = f", at {rec['where']}" if rec.get("where") else ""
        return (f"[raytune_llama] rank {rec['rank']} stalled in step {rec['step']} (no progress for "
                f"{rec['waited_s']:.1f} s, bound {rec['bound_s']:.1f} s{at}): restarting the worker group "
                f"(while run.max_failures allows)")
    remaining = (rec["max_steps"] - rec["step"]) * rec["step_time_s"]
    evaluated = ""
    if isinstance(rec.get("eval_loss"), (int, float)):
        evaluated = f" | eval {rec['eval_loss']:.4f}" + (f" (ppl {rec['eval_perplexity']:.1f})"
                                                         if "eval_perplexity" in rec else "")
    return (
        f"step {rec['step']:>5}/{rec['max_steps']} | loss {rec['loss']:.4f}{evaluated} | lr {rec['lr']:.2e} | "
        f"{rec['tokens_per_s']:,.0f} tok/s | {rec['step_time_s'] * 1000:.0f} ms/step | "
        f"world {rec['world_size']} | ETA {format_eta(remaining)}"
    )


class ProgressPrinter:
    """Polls a ProgressBoard from a daemon thread and prints each new step."""

    def __init__(self, board, interval_s: float = 0.5, stream=None, on_checkpoint=None, on_record=None):
        self.board = board
        self.on_checkpoint = on_checkpoint  # called with all records when a step checkpointed
        self.on_record = on_record  # called with every record (experiment trackers)
        self.interval_s = interval_s
        self.stream = stream or sys.stdout
        self.records: list[dict] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def start(self) -> "ProgressPrinter":
        """Start polling."""
        self._thread = threading.Thread(target=self._run, name="raytune-llama-progress", daemon=True)
        self._thread.start()
        return self

    def poll(self) -> None:
        """Fetch and print records that arrived since the last poll."""
        new = ray.get(self.board.since.remote(len(self.records)))
        for rec in new:
            self.records.append(rec)
            if self.on_record is not None:
                self.on_record(rec)  # RunTrackers.record never raises
            line = format_progress(rec)
            if line is None:
                continue
            if rec.get("checkpoint") and self.on_checkpoint is not None:
                try:
                    self.on_checkpoint(list(self.records))
                except Exception as exc:  # a report must never stop the progress line
                    log.warning("run report at step %s failed: %s", rec.get("step"), exc)
            if self._tty and "event" not in rec:
                self.stream.write("\r" + line + "\033[K")
            else:
                self.stream.write(("\n" if self._tty else "") + line + "\n")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # the board may be gone at shutdown; printing is best effort
                return

    def stop(self) -> list[dict]:
        """Stop polling, print what is left, and return every record seen."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            self.poll()
        except Exception:
            pass
        if self._tty and self.records:
            self.stream.write("\n")
            self.stream.flush()
        return self.records


def failure_reporter(board):
    """A Ray Train callback (it runs in Ray Train's controller) that pushes a FailureEvent to
    the run's progress board whenever workers of the running group fail: what tells a restart
    from a grow in the run summary (trainer/run_events.py)."""
    from ray.train import UserCallback

    from raytune_llama.trainer.run_events import FailureEvent, to_record

    class FailureReporter(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            event = FailureEvent(sorted(worker_exceptions),
                                 [_first_line(e) for _, e in sorted(worker_exceptions.items())])
            try:
                ray.get(board.push.remote(to_record(event)), timeout=10)
            except Exception as exc:  # never fail Ray Train's controller over a progress record
                log.warning("could not record a worker failure on the progress board: %s", exc)

    return FailureReporter()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:300]
