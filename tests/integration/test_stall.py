"""Hangs -> fail fast (README, "Fault tolerance and elasticity") on the shared head: rank 1 stalls
inside step 4 (RAYTUNE_LLAMA_STALL, as a rank stuck in a collective would). With
run.step_timeout_s=5 its step watchdog ends the worker within seconds, naming rank 1 and step 4,
instead of waiting for run.collective_timeout_s (600 s); Ray Train restarts the group from the
step-2 checkpoint, the injected stall does not repeat, and the run finishes with an uninterrupted
run's losses."""
import numpy as np
import pytest

from raytune_llama.testing.fault_injection import STALL_ENV
from raytune_llama.trainer.llama_trainer import LlamaTrainer
from tests.integration.tiny_run import tiny_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEPS = 6
STEP_TIMEOUT_S = 5.0
STALL_S = 600
"""How long the injected stall sleeps: only the watchdog can end it sooner."""


def _cfg(tmp, name, *extra):
    return tiny_run_config(tmp, name, STEPS, "checkpoint.every_steps=2", "train.log_every=2",
                           'parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"', *extra)


def test_stalled_rank_fails_fast_and_the_run_restarts(ray_head, tmp_path, monkeypatch, capsys):
    straight = LlamaTrainer(_cfg(tmp_path, "no-stall")).fit()
    monkeypatch.setenv(STALL_ENV, f"rank=1,step=4,seconds={STALL_S}")
    summary = LlamaTrainer(_cfg(tmp_path, "stall", "run.max_failures=1", f"run.step_timeout_s={STEP_TIMEOUT_S}")).fit()
    printed = capsys.readouterr().out

    assert summary["final_step"] == STEPS and summary["restarts"] == 1, summary
    assert summary["resumed_at_steps"] == [0, 2]  # the step-2 checkpoint; step 4 never finished
    stalls = summary["stalls"]
    # The stalled rank reports itself; rank 0, waiting for it in a collective, may report too.
    assert {s["rank"] for s in stalls} <= {0, 1} and {s["step"] for s in stalls} == {4}, stalls
    stalled = next(s for s in stalls if s["rank"] == 1)
    # Not before the bound (how much later depends on the machine's load: no upper bound here).
    assert stalled["bound_s"] == STEP_TIMEOUT_S and stalled["waited_s"] >= STEP_TIMEOUT_S, stalled
    assert stalled["where"].endswith("in stall_if_injected"), stalled  # where rank 1's loop hung
    assert "[raytune_llama] rank 1 stalled in step 4 (no progress for" in printed
    # The new worker group started after the stall began and before the injected sleep (nor the
    # 600 s collective timeout, nor torch's 30 minutes) could have ended it: the watchdog did.
    stall_started = stalled["time"] - stalled["waited_s"]
    restarted = summary["worker_group_start_times"][1]
    assert stall_started < restarted < stall_started + STALL_S, (stall_started, restarted)

    np.testing.assert_allclose(summary["losses"], straight["losses"], rtol=1e-5)
    assert summary["tokens_seen"] == straight["tokens_seen"]
    assert (tmp_path / "runs" / "stall" / ".stall-injected-rank1-step4").exists()


def test_a_user_loop_runs_under_the_step_watchdog(ray_head, tmp_path, monkeypatch, capsys):
    """The same stall in a user's own loop (examples/finetune_own_dataloader.py, one-line API):
    its training forward runs under the step watchdog, the stall is reported by rank and step,
    the worker group restarts, raytune_llama.resume continues from the step-2 checkpoint, and the
    losses equal an uninterrupted run's."""
    import importlib.util

    from tests.integration.conftest import REPO

    spec = importlib.util.spec_from_file_location("own_loader", REPO / "examples" / "finetune_own_dataloader.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    common = [arg for s in (f"model.name_or_path={tmp_path}/models/tiny-llama",
                            f"data.path={REPO}/examples/data/tiny_corpus.jsonl", f"run.storage_path={tmp_path}/runs",
                            f"train.max_steps={STEPS}", "train.global_batch_size=8", "data.seq_len=64",
                            "checkpoint.every_steps=2", 'parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"')
              for arg in ("--set", s)] + ["--tiny", "--eval-every", "100"]
    straight = example.main(common + ["--set", "run.name=loop-no-stall"])
    monkeypatch.setenv(STALL_ENV, f"rank=1,step=4,seconds={STALL_S}")
    summary = example.main(common + ["--set", "run.name=loop-stall", "--set", "run.max_failures=1",
                                     "--set", f"run.step_timeout_s={STEP_TIMEOUT_S}"])
    printed = capsys.readouterr().out
    stalled = next(s for s in summary["stalls"] if s["rank"] == 1)
    assert stalled["step"] == 4 and stalled["where"].endswith("in stall_if_injected"), summary["stalls"]
    assert "[raytune_llama] rank 1 stalled in step 4 (no progress for" in printed
    assert summary["steps"] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(summary["losses"], straight["losses"], rtol=1e-5)
