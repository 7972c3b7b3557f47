"""Run events: typed records on the progress board, and the run summary computed from them
without Ray (restarts and grows told apart by the failures Ray Train reported)."""
from raytune_llama.trainer.progress import format_progress
from raytune_llama.trainer.run_events import (CheckpointEvent, DataEvent, FailureEvent, StallEvent, StartEvent,
                                               parse_events, start_causes, summarize, to_record)


def _start(step, world, t):
    return to_record(StartEvent(step, world, f"dp_shard={world} zero=3", t))


def _step(step, world, loss=None):
    return {"step": step, "loss": loss if loss is not None else 6.0 - step, "lr": 1e-3, "tokens_per_s": 100.0 * world,
            "step_time_s": 0.1, "tokens_seen": 64 * step, "world_size": world, "max_steps": 9, "mfu": 0.01 * world}


def _failure(ranks, t):
    return to_record(FailureEvent(ranks, [f"ActorDiedError: worker {r} died" for r in ranks], t))


def test_records_round_trip_through_plain_dicts():
    events = [StartEvent(0, 2, "ddp", 1.0), FailureEvent([1], ["RuntimeError: boom"], 2.0),
              StallEvent(1, 4, 5.0, 5.0, "x.py:1 in f", 3.0), DataEvent(3, 1.0, 0, 0, ["a", "b"]),
              CheckpointEvent(4, "/runs/r/checkpoint_0", 2.5, None)]
    records = [to_record(e) for e in events]
    assert [r["event"] for r in records] == ["start", "failure", "stall", "data", "checkpoint"]
    assert "best" not in records[-1] and records[-1]["path"] == "/runs/r/checkpoint_0"  # None left out
    for event, kind in zip(events, (StartEvent, FailureEvent, StallEvent, DataEvent, CheckpointEvent)):
        assert parse_events(records, kind) == [event]


def test_a_failure_restart_at_a_larger_size_is_a_restart_not_a_grow():
    records = [_start(0, 2, 1.0), _step(1, 2), _step(2, 2),
               _start(2, 4, 2.0),                         # capacity came back: a grow
               _step(3, 4), _failure([3], 3.0),
               _start(2, 4, 4.0),                         # same size after a failure: a restart
               _step(3, 4), _failure([0, 1], 5.0),
               _start(3, 8, 6.0),                         # larger, but after a failure: a restart
               _step(4, 8), to_record(StallEvent(2, 5, 9.0, 9.0, None, 7.0)),
               _start(4, 8, 8.0),                         # after a stall: a restart
               _step(5, 8), _start(5, 4, 9.0), _step(6, 4)]  # smaller with no failure recorded: a restart
    assert start_causes(records) == ["first", "grow", "restart", "restart", "restart", "restart"]
    s = summarize(records)
    assert (s["restarts"], s["grows"]) == (4, 1)
    assert s["world_size_history"] == [2, 4, 4, 8, 8, 4] and s["resumed_at_steps"] == [0, 2, 2, 3, 4, 5]
    assert [f["ranks"] for f in s["failures"]] == [[3], [0, 1]]
    assert s["steps"] == [1, 2, 3, 4, 5, 6] and s["steps_redone"] == 1  # step 3 ran twice
    assert s["final_step"] == 6 and s["world_size"] == 4 and s["tokens_seen"] == 384
    steady = [200.0, 400.0, 800.0, 800.0, 400.0]  # committed steps 2-6 (step 1 is warm-up); step 3 from its re-run
    assert s["mean_tokens_per_s"] == sum(steady) / len(steady)
    assert s["first_loss"] == 5.0 and s["final_loss"] == 0.0 and len(s["stalls"]) == 1


def test_empty_run_summary_and_failure_line():
    s = summarize([_start(9, 2, 1.0)])
    assert s["steps"] == [] and s["final_step"] is None and s["restarts"] == 0 and s["start_causes"] == ["first"]
    line = format_progress(_failure([1], 1.0))
    assert line.startswith("[raytune_llama] worker(s) [1] failed (ActorDiedError: worker 1 died)")
    assert "restarts from the latest checkpoint" in line
