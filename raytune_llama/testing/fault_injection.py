"""Fault injection for a running training job (test tooling, not part of the training path): SIGKILL Ray Train worker processes at chosen
moments (after the run has committed checkpoints), or make one rank stall inside a step
(RAYTUNE_LLAMA_STALL), to prove that a run survives them. Used by the chaos tests and
`bench/chaos_report.py`; the killer also works against a real cluster's job from a process
on the same node as the workers."""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def checkpoint_dirs(run_dir: Path) -> set[str]:
    """Names of the checkpoint directories in a run directory right now."""
    return {p.name for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()}


def alive_worker_pids(address: str) -> list[int]:
    """PIDs of the live Ray Train worker actors of the cluster at `address`."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return sorted(a.pid for a in actors)


class WorkerKiller(threading.Thread):
    """Kills one random training worker each time `every` new checkpoints have appeared,
    `kills` times; `.kill_times` holds when (time.time())."""

    def __init__(self, address: str, run_dir: Path, kills: int = 1, every: int = 2,
                 seed: int = 0, timeout_s: float = 600):
        super().__init__(daemon=True, name="raytune-llama-worker-killer")
        self.address, self.run_dir, self.kills, self.every = address, Path(run_dir), kills, every
        self.rng = random.Random(seed)
        self.deadline = time.time() + timeout_s
        self.kill_times: list[float] = []
        self.killed_pids: list[int] = []
        self.stopped = threading.Event()

    def _workers(self) -> list[int]:
        pids: list[int] = []
        while not pids and time.time() < self.deadline and not self.stopped.is_set():
            pids = alive_worker_pids(self.address)
            time.sleep(0.2)
        return pids

    def run(self) -> None:
        """Wait for new checkpoints, kill, repeat."""
        seen = checkpoint_dirs(self.run_dir)
        while len(self.kill_times) < self.kills and time.time() < self.deadline and not self.stopped.is_set():
            pids = self._workers()  # slow API: ask before the moment comes
            new = 0
            while new < self.every and time.time() < self.deadline and not self.stopped.is_set():
                now = checkpoint_dirs(self.run_dir)
                new, seen_now = new + len(now - seen), now
                seen = seen_now
                time.sleep(0.01)
            if new >= self.every and pids:
                pid = self.rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue  # it ended on its own: try the next checkpoint
                self.kill_times.append(time.time())
                self.killed_pids.append(pid)
                time.sleep(1.0)  # let Ray notice before looking for the new worker group

    def stop(self) -> None:
        """Stop waiting (the run has ended)."""
        self.stopped.set()


STALL_ENV = "RAYTUNE_LLAMA_STALL"
"""Stall injection, e.g. RAYTUNE_LLAMA_STALL="rank=1,step=4,seconds=600": that rank sleeps
inside that step (numbered as the progress lines number it) the first time the run gets
there, as a rank stuck in a collective would. Set on the driver; the driver forwards it to
the workers (`forwarded_env`). A marker file in the run directory keeps the restarted worker
group from stalling again."""


@dataclass(frozen=True)
class StallSpec:
    rank: int
    step: int
    seconds: float


def parse_stall(text: str) -> StallSpec:
    """'rank=1,step=4,seconds=600' -> StallSpec; a ValueError names what is wrong."""
    example = f'{STALL_ENV}="rank=1,step=4,seconds=600"'
    try:
        fields = dict(part.split("=", 1) for part in text.replace(" ", "").split(",") if part)
        spec = StallSpec(int(fields.pop("rank")), int(fields.pop("step")), float(fields.pop("seconds")))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{STALL_ENV}={text!r}: expected rank, step and seconds, e.g. {example} ({exc})") from None
    if fields or spec.rank < 0 or spec.step < 1 or spec.seconds <= 0:
        raise ValueError(f"{STALL_ENV}={text!r}: rank >= 0, step >= 1 and seconds > 0 only, e.g. {example}")
    return spec


def forwarded_env() -> dict[str, str]:
    """Fault-injection variables of the driver's environment, for the workers' runtime env
    (worker processes do not inherit the driver's environment); checked here so that a
    malformed value fails on the driver."""
    text = os.environ.get(STALL_ENV)
    if not text:
        return {}
    parse_stall(text)
    return {STALL_ENV: text}


def stall_hook(rank: int, run_dir) -> "Callable[[int], None] | None":
    """The per-step stall check for this rank when RAYTUNE_LLAMA_STALL asks for one, else None
    (the training loop then checks nothing at all per step)."""
    text = os.environ.get(STALL_ENV)
    if not text or parse_stall(text).rank != rank:
        return None
    return lambda step: stall_if_injected(rank, step, run_dir)


def stall_if_injected(rank: int, step: int, run_dir) -> None:
    """Sleep here if RAYTUNE_LLAMA_STALL asks this rank to stall in this step and the run
    has not stalled there before (the marker file is created first, atomically)."""
    text = os.environ.get(STALL_ENV)
    if not text:
        return
    spec = parse_stall(text)
    if (spec.rank, spec.step) != (rank, step):
        return
    marker = Path(run_dir) / f".stall-injected-rank{rank}-step{step}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # stalled here in an earlier attempt: the restarted group goes on
    time.sleep(spec.seconds)
