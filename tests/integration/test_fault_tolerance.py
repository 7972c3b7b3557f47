"""Fault tolerance on the shared head (README, "Fault tolerance and elasticity"): a SIGKILLed
worker is restarted from
the latest checkpoint and the run finishes with exactly the losses of an uninterrupted run
(lost workers, exact resume); with 0, 1 and 3 injected failures every document id of the corpus is trained on
exactly once, in the run's seeded (shuffled) order (exactly-once data, audited through the token store); a checkpoint saved
by one layout and world size resumes in another (resume in any layout); a corrupt newest checkpoint is skipped
for the previous good one (verified checkpoints)."""

import numpy as np
import pytest

from raytune_llama.testing.fault_injection import WorkerKiller
from raytune_llama.trainer.llama_trainer import LlamaTrainer
from tests.integration.tiny_run import seeded_order_ids, tiny_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEPS = 8


def _cfg(tmp, name, *extra):
    return tiny_run_config(tmp, name, STEPS, "checkpoint.every_steps=2", "train.log_every=2", "data.id_column=id",
                           *extra)


def _assert_exactly_once(summary, straight):
    """Exactly-once data: the committed steps' document ids are exactly those of the seeded
    order's first global batches, in order, each once, and the same as the uninterrupted run's."""
    audit = summary["data_audit"]
    assert audit["duplicated"] == [] and audit["problems"] == [], audit
    expected = seeded_order_ids(summary["token_store"], range(summary["final_step"]), 8)
    assert audit["ids"] == expected  # nothing skipped, nothing out of order
    assert audit["ids"] == straight["data_audit"]["ids"] and audit["documents"] > 0


@pytest.fixture(scope="module")
def baseline(ray_head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    return tmp, LlamaTrainer(_cfg(tmp, "baseline", 'parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"')).fit()


def test_uninterrupted_run_trains_each_document_once(baseline):
    _, straight = baseline
    _assert_exactly_once(straight, straight)


def test_sigkilled_worker_restarts_and_loses_nothing(ray_head, baseline):
    tmp, straight = baseline
    # Kill once the second checkpoint directory appears: the first is committed by then.
    killer = WorkerKiller(ray_head.gcs_address, tmp / "runs" / "chaos", kills=1, every=2)
    killer.start()
    summary = LlamaTrainer(_cfg(tmp, "chaos", "run.max_failures=2",
                                'parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"')).fit()
    killer.stop()
    assert killer.killed_pids, "the worker was never killed (no checkpoint appeared in time)"
    assert summary["final_step"] == STEPS and summary["restarts"] == 1, summary
    # Ray Train's own failure callback recorded the lost worker (what makes it a restart)
    assert len(summary["failures"]) >= 1 and summary["start_causes"] == ["first", "restart"], summary
    # Resumed at a committed checkpoint: at most one checkpoint interval (2 steps) of work lost.
    assert summary["resumed_at_steps"][0] == 0 and summary["resumed_at_steps"][1] >= 2
    np.testing.assert_allclose(summary["losses"], straight["losses"], rtol=1e-5)
    assert summary["tokens_seen"] == straight["tokens_seen"]  # no sample lost or repeated
    _assert_exactly_once(summary, straight)


def test_three_failures_lose_and_repeat_no_document(ray_head, baseline):
    """Exactly-once data and lost workers, with 3 SIGKILLs, one after each new checkpoint: 3
    restarts, same losses, and the audit of document ids over the committed steps equals the
    uninterrupted run's."""
    tmp, straight = baseline
    killer = WorkerKiller(ray_head.gcs_address, tmp / "runs" / "chaos3", kills=3, every=1, seed=3)
    killer.start()
    summary = LlamaTrainer(_cfg(tmp, "chaos3", "run.max_failures=4",
                                'parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"')).fit()
    killer.stop()
    assert len(killer.killed_pids) == 3 and summary["restarts"] == 3, (killer.killed_pids, summary["restarts"])
    assert summary["final_step"] == STEPS and summary["steps_redone"] <= 3 * 2  # <= one interval per kill
    np.testing.assert_allclose(summary["losses"], straight["losses"], rtol=1e-5)
    _assert_exactly_once(summary, straight)


@pytest.mark.parametrize("name, first, second", [
    ("fsdp2-to-1", ('parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"',),
     ("parallel.num_workers=1", 'parallel.layout="dp_replicate=1,micro_batch_size=4"')),
    ("fsdp-to-tp", ('parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"',),
     ('parallel.layout="tp=2,micro_batch_size=4"',)),
])
def test_resume_in_another_layout_and_world_size(baseline, name, first, second):
    """Resume in any layout: stop at step 4 under one layout, resume under another; same losses, same batch."""
    tmp, straight = baseline
    a = LlamaTrainer(_cfg(tmp, name, "train.stop_after_steps=4", *first)).fit()
    b = LlamaTrainer(_cfg(tmp, name, *second)).fit()
    assert b["steps"] == list(range(5, STEPS + 1)) and b["world_size_history"] == [b["world_size"]]
    np.testing.assert_allclose(a["losses"] + b["losses"], straight["losses"], rtol=1e-5)
    assert b["tokens_seen"] == straight["tokens_seen"]


def test_corrupt_newest_checkpoint_falls_back_to_previous(baseline):
    """Verified checkpoints: flip a byte in the newest checkpoint; the resume warns and uses the one before."""
    tmp, straight = baseline
    layout = 'parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"'
    full = "checkpoint.format=full"  # the sharded format's corruption test is below
    LlamaTrainer(_cfg(tmp, "corrupt", "train.stop_after_steps=6", layout, full)).fit()
    checkpoints = sorted(p for p in (tmp / "runs" / "corrupt").glob("checkpoint_*") if p.is_dir())
    newest = checkpoints[-1] / "model.pt"
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    resumed = LlamaTrainer(_cfg(tmp, "corrupt", layout, full)).fit()
    assert resumed["steps"][0] == 5  # step 6's checkpoint was refused; step 4's was used
    np.testing.assert_allclose(resumed["losses"], straight["losses"][4:], rtol=1e-5)


SHARDED = "checkpoint.format=sharded"


@pytest.mark.slow
@pytest.mark.parametrize("name, first, second", [
    ("sharded-fsdp2-to-1", ('parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"',),
     ("parallel.num_workers=1", 'parallel.layout="dp_replicate=1,micro_batch_size=4"')),
    ("sharded-fsdp-to-tp", ('parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"',),
     ('parallel.layout="tp=2,micro_batch_size=4"',)),
])
def test_sharded_checkpoint_resumes_in_another_layout(baseline, name, first, second):
    """checkpoint.format=sharded: every rank writes only its own DCP shards (+ its manifest)
    into the same checkpoint_* folder; DCP reshards on load into the new layout/world size."""
    tmp, straight = baseline
    a = LlamaTrainer(_cfg(tmp, name, "train.stop_after_steps=4", SHARDED, *first)).fit()
    newest = sorted(p for p in (tmp / "runs" / name).glob("checkpoint_*") if p.is_dir())[-1]
    names = {p.name for p in newest.iterdir()}
    # Both ranks' files were merged by Ray Train into one directory; no whole-model file.
    assert {"MANIFEST.json", "MANIFEST.rank0.json", "MANIFEST.rank1.json", "meta.json", ".metadata"} <= names, names
    assert "model.pt" not in names and sum(n.endswith(".distcp") for n in names) == 2, names
    b = LlamaTrainer(_cfg(tmp, name, SHARDED, *second)).fit()
    assert b["steps"] == list(range(5, STEPS + 1)) and b["world_size_history"] == [b["world_size"]]
    np.testing.assert_allclose(a["losses"] + b["losses"], straight["losses"], rtol=1e-5)
    assert b["tokens_seen"] == straight["tokens_seen"]


@pytest.mark.slow
def test_sharded_checkpoint_missing_rank_file_falls_back(baseline):
    """A sharded checkpoint whose rank-1 shard is gone is refused; the one before is used.
    The run saves in the background (checkpoint.async_save), so the step-4 checkpoint it
    falls back to was written while step 5 trained."""
    tmp, straight = baseline
    layout = 'parallel.layout="dp_shard=2,zero_stage=3,micro_batch_size=2"'
    LlamaTrainer(_cfg(tmp, "sharded-corrupt", "train.stop_after_steps=6", SHARDED, layout,
                      "checkpoint.async_save=true")).fit()
    checkpoints = sorted(p for p in (tmp / "runs" / "sharded-corrupt").glob("checkpoint_*") if p.is_dir())
    next(checkpoints[-1].glob("__1_*.distcp")).unlink()
    resumed = LlamaTrainer(_cfg(tmp, "sharded-corrupt", SHARDED, layout)).fit()
    assert resumed["steps"][0] == 5  # step 6's checkpoint was refused; step 4's was used
    np.testing.assert_allclose(resumed["losses"], straight["losses"][4:], rtol=1e-5)
