"""Hangs -> fail fast (README, "Fault tolerance and elasticity"), run side: run.step_timeout_s
validation, the RAYTUNE_LLAMA_STALL injection (parsing, forwarding, stalls once per run), the
driver's stall line, and the run summary's `stalls` (stall events never count as steps)."""
import types
from pathlib import Path

import pytest

from raytune_llama.config import Config, ConfigError, load_config
from raytune_llama.testing import fault_injection as chaos
from raytune_llama.trainer.llama_trainer import format_summary
from raytune_llama.trainer.progress import format_progress
from raytune_llama.trainer.run_events import StallEvent, parse_events, step_records, summarize
from raytune_llama.trainer.step_guard import follows_checkpoint, stall_record

TINY = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_cpu.yaml"


def _problems(*overrides) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, list(overrides)).validate(check_files=False)
    return err.value.problems


def test_step_timeout_defaults_to_automatic_and_accepts_numbers():
    assert Config().run.step_timeout_s is None
    cfg = load_config(TINY, ["run.step_timeout_s=30", "run.collective_timeout_s=60"]).validate(check_files=False)
    assert cfg.run.step_timeout_s == 30


@pytest.mark.parametrize("value, expected", [
    ("0", "run.step_timeout_s: 0 must be a number of seconds >= 1, or null"),
    ("fast", "run.step_timeout_s: 'fast' must be a number of seconds >= 1, or null"),
    ("true", "run.step_timeout_s: True must be a number of seconds >= 1, or null"),
    ("900", "run.step_timeout_s: 900 must be <= run.collective_timeout_s (600)"),
])
def test_bad_step_timeout_names_field_value_and_fix(value, expected):
    problems = _problems(f"run.step_timeout_s={value}")
    assert len(problems) == 1 and problems[0].startswith(expected), problems


EXAMPLE = 'e.g. RAYTUNE_LLAMA_STALL="rank=1,step=4,seconds=600"'
ONLY = f"rank >= 0, step >= 1 and seconds > 0 only, {EXAMPLE}"


@pytest.mark.parametrize("bad, why", [
    ("rank=1,step=4", f"expected rank, step and seconds, {EXAMPLE} ('seconds')"),  # names the missing field
    ("rank=x,step=4,seconds=5", f"expected rank, step and seconds, {EXAMPLE} "
                                "(invalid literal for int() with base 10: 'x')"),  # and the bad value
    ("rank=1,step=0,seconds=5", ONLY),
    ("rank=-1,step=4,seconds=5", ONLY),
    ("rank=1,step=4,seconds=0", ONLY),
    ("rank=1,step=4,seconds=5,at=2", ONLY),
])
def test_bad_stall_spec_names_value_rule_and_example(bad, why):
    with pytest.raises(ValueError) as err:
        chaos.parse_stall(bad)
    assert str(err.value) == f"RAYTUNE_LLAMA_STALL={bad!r}: {why}"


def test_stall_spec_parsing_and_forwarding(monkeypatch):
    assert chaos.parse_stall("rank=1, step=4, seconds=600") == chaos.StallSpec(1, 4, 600.0)
    assert chaos.parse_stall("rank=0,step=1,seconds=0.3") == chaos.StallSpec(0, 1, 0.3)  # the smallest legal values
    monkeypatch.delenv(chaos.STALL_ENV, raising=False)
    assert chaos.forwarded_env() == {}
    monkeypatch.setenv(chaos.STALL_ENV, "rank=1,step=4,seconds=600")
    assert chaos.forwarded_env() == {chaos.STALL_ENV: "rank=1,step=4,seconds=600"}
    monkeypatch.setenv(chaos.STALL_ENV, "rank=1")
    with pytest.raises(ValueError, match=r"RAYTUNE_LLAMA_STALL='rank=1': expected rank, step and seconds"):
        chaos.forwarded_env()  # a typo fails on the driver, not silently on the workers


def test_injected_stall_happens_once_per_run(monkeypatch, tmp_path):
    slept: list[float] = []
    # Record the stall instead of waiting: no wall-clock bound a loaded machine could break.
    monkeypatch.setattr(chaos, "time", types.SimpleNamespace(sleep=slept.append))
    monkeypatch.setenv(chaos.STALL_ENV, "rank=1,step=4,seconds=0.3")
    for rank, step in ((0, 4), (1, 3)):
        chaos.stall_if_injected(rank, step, tmp_path)
    assert slept == []  # other ranks and steps go on
    chaos.stall_if_injected(1, 4, tmp_path)
    assert slept == [0.3]
    assert (tmp_path / ".stall-injected-rank1-step4").exists()
    chaos.stall_if_injected(1, 4, tmp_path)  # the restarted worker group does not stall again
    assert slept == [0.3]


def test_step_after_a_checkpoint_is_relaxed():
    cfg = load_config(TINY, ["checkpoint.every_steps=2"])
    assert [follows_checkpoint(cfg, s) for s in range(5)] == [False, False, True, False, True]
    assert not follows_checkpoint(load_config(TINY, ["checkpoint.every_steps=0"]), 4)


def _step(step: int) -> dict:
    return {"step": step, "loss": 5.0 - step, "lr": 1e-3, "tokens_per_s": 100.0, "step_time_s": 0.1,
            "tokens_seen": 64 * step, "world_size": 2, "max_steps": 4}


def test_stall_line_and_summary():
    stall = stall_record(1, 4, 5.0123, 5.0, "testing/fault_injection.py:131 in stall_if_injected")
    assert format_progress(stall) == (
        "[raytune_llama] rank 1 stalled in step 4 (no progress for 5.0 s, bound 5.0 s, at "
        "testing/fault_injection.py:131 in stall_if_injected): restarting the worker group (while "
        "run.max_failures allows)")
    assert "at " not in format_progress(stall_record(0, 4, 5.0, 5.0))
    start = {"event": "start", "step": 0, "world_size": 2, "layout": "ddp", "time": 1.0}
    records = [start, _step(1), _step(2), _step(3), stall, dict(start, step=2, time=2.0), _step(3), _step(4)]
    assert [r["step"] for r in step_records(records)] == [1, 2, 3, 4]
    assert parse_events(records, StallEvent) == [StallEvent(1, 4, 5.012, 5.0, stall["where"], stall["time"])]
    summary = summarize(records)
    assert summary["stalls"] == [{k: stall[k] for k in ("rank", "step", "waited_s", "bound_s", "where", "time")}]
    assert summary["restarts"] == 1 and summary["steps_redone"] == 1 and summary["steps"] == [1, 2, 3, 4]
    summary.update(run_name="r", max_steps=4, wall_time_s=10.0, checkpoint=None)
    assert "rank 1 stalled in step 4 (bound 5.0 s)" in format_summary(summary)
