"""Hangs -> fail fast (README, "Fault tolerance and elasticity"), engine side: StepWatchdog bounds
(first step, fixed, automatic, relaxed), the process-ending path (run in a subprocess: exit status,
message naming rank and step, a bounded stall callback), and the process-group timeout it sets (real
gloo groups)."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch.multiprocessing as mp

from raytune_llama.engine import step_watchdog
from raytune_llama.engine.step_watchdog import STALL_EXIT_CODE, StepWatchdog


class _FakeClock:
    """The watchdog's clock: steps take exactly what the test says, and no real delay (a loaded
    machine) can make a step look slow or run past its bound, which would end this process."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _watchdog(clock=None, **kw) -> StepWatchdog:
    return StepWatchdog(0, kw.pop("first", 60.0), tighten_process_groups=kw.pop("tighten", False),
                        clock=clock or _FakeClock(), **kw)


def test_first_step_then_fixed_bound_never_above_the_first():
    wd = _watchdog(step_timeout_s=5.0)
    assert wd.bound_s == 60.0
    with wd.step(1) as bound:
        assert bound == 60.0  # the first step is bounded by collective_timeout_s
    assert wd.bound_s == 5.0
    with wd.step(2) as bound:
        assert bound == 5.0
    with wd.step(3, relaxed=True) as bound:
        assert bound == 60.0  # e.g. the step after a checkpoint
    wd.close()
    assert _watchdog(first=20.0, step_timeout_s=50.0).bound_s == 20.0
    high = _watchdog(first=20.0, step_timeout_s=50.0)
    with high.step(1):
        pass
    assert high.bound_s == 20.0
    high.close()


def test_automatic_bound_follows_the_slowest_ordinary_step():
    clock = _FakeClock()
    wd = _watchdog(clock, auto_floor_s=2.0, auto_factor=100.0)
    with wd.step(1):
        clock.now += 0.3  # warm-up: only counts until an ordinary step has been timed
    assert wd.bound_s == pytest.approx(30.0)
    with wd.step(2):
        clock.now += 0.01
    assert wd.bound_s == 2.0  # tightened to the ordinary steps (100 x 0.01 s), at least the floor
    with wd.step(3):
        clock.now += 0.05
    assert wd.bound_s == pytest.approx(5.0)  # the slowest ordinary step sets it
    with wd.step(4):
        clock.now += 0.02
    assert wd.bound_s == pytest.approx(5.0)  # a faster step does not lower it
    with wd.step(5, relaxed=True):
        clock.now += 0.2
    assert wd.bound_s == pytest.approx(5.0)  # nor does a relaxed one (it ran under the long bound) raise it
    floor = _watchdog(auto_floor_s=3.0, auto_factor=1.0)
    with floor.step(1):
        pass
    assert floor.bound_s == 3.0
    capped = _watchdog(first=10.0, auto_floor_s=30.0)
    with capped.step(1):
        pass
    assert capped.bound_s == 10.0
    for w in (wd, floor, capped):
        w.close()


def test_a_failed_step_does_not_count():
    wd = _watchdog(step_timeout_s=5.0)
    with pytest.raises(RuntimeError):
        with wd.step(1):
            raise RuntimeError("collective timed out")
    assert wd.steps_done == 0 and wd.bound_s == 60.0
    wd.close()


def test_collective_timeout_is_tightened_inside_steps_only(monkeypatch):
    seen = []
    monkeypatch.setattr(step_watchdog, "set_collective_timeout", lambda s: seen.append(s) or 1)
    wd = _watchdog(step_timeout_s=5.0, tighten=True)
    with wd.step(1):
        assert seen == [60.0]  # subgroups come to collective_timeout_s (they start at torch's 30 min)
    with wd.step(2):
        assert seen[-1] == 10.0  # 2 x the step bound: the watchdog's message comes first
    assert seen[-1] == 60.0  # checkpoint and export collectives keep the long bound
    with wd.step(3, relaxed=True):
        assert seen[-1] == 60.0
    wd.close()


STALLING_LOOP = textwrap.dedent("""
    import json, sys, time
    from raytune_llama.engine.step_watchdog import StepWatchdog

    mode = sys.argv[1]
    def report(rank, step, waited_s, bound_s):
        print(json.dumps({"rank": rank, "step": step, "waited_s": waited_s, "bound_s": bound_s,
                          "where": wd.stalled_at}), flush=True)
        if mode == "hanging-callback":
            while True:  # never returns: the watchdog must give up on it
                time.sleep(3600)
        print("callback returned", flush=True)

    # The first (and relaxed) bound is far above anything a loaded machine does to sleep(1.0).
    wd = StepWatchdog(3, first_step_timeout_s=600, step_timeout_s=0.5, on_stall=report,
                      callback_timeout_s=0.5, tighten_process_groups=False)
    with wd.step(1):
        pass
    with wd.step(2, relaxed=True):
        time.sleep(1.0)  # longer than 0.5 s, but relaxed
    print("relaxed step survived", flush=True)
    def stuck_in_a_collective():
        while True:  # never returns: only the watchdog ends this process
            time.sleep(3600)
    with wd.step(3):
        stuck_in_a_collective()
    print("not reached", flush=True)
""")


@pytest.mark.parametrize("mode", ["callback", "hanging-callback"])
def test_a_stalled_step_ends_the_process_naming_rank_and_step(mode):
    # The stalled step and the hanging callback never return by themselves, so the process can only
    # end through the watchdog: its exit status says it did, however long a loaded machine made it
    # take. The timeout only turns a broken watchdog (a hang) into a failure; it is not a bound.
    res = subprocess.run([sys.executable, "-c", STALLING_LOOP, mode], capture_output=True, text=True, timeout=900)
    assert res.returncode == STALL_EXIT_CODE, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "relaxed step survived" and "not reached" not in res.stdout, res.stdout
    report = json.loads(lines[1])
    assert (report["rank"], report["step"], report["bound_s"]) == (3, 3, 0.5)
    # Not before the bound; the stalled frame is the loop's, not the watchdog's.
    assert report["waited_s"] >= 0.5 and report["where"].endswith(" in stuck_in_a_collective"), report
    # A hanging callback is abandoned (the process ended while it still waited); a returning one is awaited.
    assert lines[2:] == ([] if mode == "hanging-callback" else ["callback returned"]), res.stdout
    assert "rank 3 stalled in step 3: no progress for" in res.stderr and "bound 0.5 s" in res.stderr
    assert "stuck_in_a_collective" in res.stderr  # the loop thread's stack shows where it hung


GROUP_TIMEOUT_S = 120
"""The timeout the gloo groups are created with; the test tightens it to TIGHT_S."""
TIGHT_S = 1.5


def _gloo_rank(rank: int, store: str, out: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    sub = dist.new_group([0, 1])  # like a DeviceMesh dimension: created with torch's default timeout
    t = torch.ones(2)
    dist.all_reduce(t, group=sub)
    groups = step_watchdog.set_collective_timeout(TIGHT_S)
    if rank == 1:
        # Stay away from the collective until rank 0 has its answer (longer than the groups'
        # own timeout): rank 0 can only finish through a timeout, and the message names which.
        deadline = time.monotonic() + 3 * GROUP_TIMEOUT_S
        while not os.path.exists(out) and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)
    started = time.monotonic()
    try:
        dist.all_reduce(t, group=sub)
        result = {"error": None}
    except Exception as exc:
        result = {"error": str(exc)}
    result.update(groups=groups, waited=time.monotonic() - started)
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)  # rank 1 may look at any moment: the file appears whole
    # A gloo collective that timed out leaves its worker thread behind, and the process group's
    # destructors abort the process at exit ("terminate called without an active exception"):
    # the answer is on disk, so leave without running them.
    os._exit(0)


def test_gloo_collectives_take_the_tightened_timeout(tmp_path):
    """torch.distributed's _set_pg_timeout reaches gloo: a collective that waits for a
    stalled peer fails with the new 1.5 s timeout instead of the 120 s the group was created with."""
    out = tmp_path / "rank0.json"
    mp.spawn(_gloo_rank, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["groups"] == 2, result  # the default group and the subgroup
    # gloo names the timeout it waited for: the tightened one, not the group's own (120000ms).
    assert result["error"] and f"Timed out waiting {int(TIGHT_S * 1000)}ms" in result["error"], result
    assert result["waited"] >= TIGHT_S * 0.9, result  # it did wait (no upper bound: a loaded machine is slow)
