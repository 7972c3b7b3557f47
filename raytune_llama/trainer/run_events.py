"""The events of a run and the summary built from them.

Rank 0 pushes a step record after every optimizer step (a dict of metrics: loss, lr, tokens/s,
... and whatever a user's loop logs), and typed events around them: a worker group started
(StartEvent), Ray Train saw a worker fail (FailureEvent, from its own failure callback,
trainer/progress.py FailureReporter), a rank's step ran past its bound (StallEvent), the rows
each rank trained on (DataEvent, data.id_column) and a checkpoint registered (CheckpointEvent).
They travel as plain dicts (`to_record`) through the progress board to the driver, into
steps.jsonl and the experiment trackers; `parse_events` turns them back into dataclasses and
`summarize` computes the run summary from them, so restarts and grows are told apart by what
happened (a failure before a start makes it a restart, whatever the new world size) rather than
by the size alone.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Iterable


@dataclass(frozen=True)
class StartEvent:
    """A worker group started training at `step` (the first start, a restart or a resize)."""

    kind: ClassVar[str] = "start"
    step: int
    world_size: int
    layout: str | None = None
    time: float | None = None


@dataclass(frozen=True)
class FailureEvent:
    """Ray Train saw worker(s) of the running group fail (an exception, a lost process or node);
    the group is restarted next if run.max_failures allows."""

    kind: ClassVar[str] = "failure"
    ranks: list[int]
    errors: list[str]
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class StallEvent:
    """A rank's step ran past its bound (run.step_timeout_s); that worker ends itself."""

    kind: ClassVar[str] = "stall"
    rank: int
    step: int
    waited_s: float
    bound_s: float
    where: str | None = None
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class DataEvent:
    """The document ids of the rows one rank trained on in one step (data.id_column)."""

    kind: ClassVar[str] = "data"
    step: int
    attempt: float
    rank: int
    dp_rank: int
    ids: list[str]


@dataclass(frozen=True)
class CheckpointEvent:
    """A checkpoint registered after `step` (path None when the storage is not a filesystem)."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str | None
    eval_loss: float | None = None
    best: Any = None


EVENT_TYPES = {cls.kind: cls for cls in (StartEvent, FailureEvent, StallEvent, DataEvent, CheckpointEvent)}


def to_record(event: Any) -> dict:
    """The plain dict pushed to the progress board: {"event": kind, fields...}; optional
    fields that are None are left out."""
    values = {k: v for k, v in asdict(event).items() if v is not None or k in ("path", "layout")}
    return {"event": event.kind, **values}


def parse_events(records: Iterable[dict], kind: type) -> list:
    """The records of one event type, as dataclasses, in arrival order."""
    names = {f.name for f in fields(kind)}
    return [kind(**{k: v for k, v in r.items() if k in names}) for r in records if r.get("event") == kind.kind]


def step_records(records: Iterable[dict]) -> list[dict]:
    """Step records only, one per step: after a restart the re-run of a step replaces the
    record from before the failure (that step was never committed)."""
    by_step = {}
    for rec in records:
        if "event" not in rec:
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def start_causes(records: Iterable[dict]) -> list[str]:
    """Why each worker group started, in order: 'first'; 'restart' after a failure or a stall
    (whatever size the new group has: Ray Train restarts with the workers it can get); 'grow'
    when a group started larger without a failure (an elastic run got capacity back); any other
    start (no failure recorded, not larger) counts as a 'restart'."""
    causes: list[str] = []
    failed, size = False, None
    for rec in records:
        kind = rec.get("event")
        if kind in (FailureEvent.kind, StallEvent.kind):
            failed = True
        elif kind == StartEvent.kind:
            if size is None:
                causes.append("first")
            else:
                causes.append("restart" if failed or rec["world_size"] <= size else "grow")
            failed, size = False, rec["world_size"]
    return causes


def summarize(records: list[dict]) -> dict:
    """The part of the run summary that the events alone determine (trainer/llama_trainer.py
    adds the configuration, dataset, data audit and checkpoint facts)."""
    steps = step_records(records)
    starts = parse_events(records, StartEvent)
    causes = start_causes(records)
    last = steps[-1] if steps else {}
    steady = steps[1:] or steps  # the first step includes warm-up work
    mfus = [r["mfu"] for r in steady if "mfu" in r]
    return {
        "steps_this_run": len(steps),
        "final_step": last.get("step"),
        "first_loss": steps[0]["loss"] if steps else None,
        "final_loss": last.get("loss"),
        "mean_tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady) if steady else 0.0,
        "mean_mfu": sum(mfus) / len(mfus) if mfus else None,
        "predicted_step_time_s": last.get("predicted_step_time_s"),
        "mean_step_time_s": sum(r["step_time_s"] for r in steady) / len(steady) if steady else None,
        "tokens_seen": last.get("tokens_seen"),
        "world_size": last.get("world_size"),
        # worker-group restarts after a failure, and grows: Ray Train restarting the group at a
        # larger world size because capacity came back (elastic runs; not a failure)
        "restarts": causes.count("restart"),
        "grows": causes.count("grow"),
        "failures": [{"ranks": f.ranks, "errors": f.errors, "time": f.time}
                     for f in parse_events(records, FailureEvent)],
        # steps computed again after a restart (work lost since the last checkpoint)
        "steps_redone": sum(1 for r in records if "event" not in r) - len(steps),
        "world_size_history": [s.world_size for s in starts],
        "layout_history": [s.layout for s in starts],  # re-planned at every new size
        "start_causes": causes,
        "resumed_at_steps": [s.step for s in starts],
        "worker_group_start_times": [s.time for s in starts],
        # ranks whose step ran past its bound (run.step_timeout_s), each ending its worker group
        "stalls": [asdict(s) for s in parse_events(records, StallEvent)],
        "losses": [r["loss"] for r in steps],
        "steps": [r["step"] for r in steps],
    }
