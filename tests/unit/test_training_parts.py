"""LR schedule, checkpoint manifest/integrity, and the DP step's loss."""
import os

import pytest
import torch

from raytune_llama.engine.checkpoint import CheckpointError, load_training_state, save_training_state, verify_checkpoint
from raytune_llama.engine.lr_schedule import lr_at


def test_lr_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 1.0, 4, 20, 0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lr_at(20, 1.0, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_at(100, 1.0, 4, 20, 0.1) == pytest.approx(0.1)


def test_checkpoint_round_trip_and_integrity(tmp_path):
    model = {"w": torch.arange(6.0)}
    save_training_state(tmp_path, model=model, optimizer={"state": {}, "param_groups": []}, meta={"step": 3, "cursor": 48})
    state = load_training_state(tmp_path)
    assert torch.equal(state["model"]["w"], model["w"]) and state["meta"]["cursor"] == 48
    # flip one byte: the file is named
    good = (tmp_path / "model.pt").read_bytes()
    blob = bytearray(good)
    blob[-20] ^= 0xFF
    (tmp_path / "model.pt").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="model.pt: SHA-256"):
        verify_checkpoint(tmp_path)
    (tmp_path / "model.pt").write_bytes(good)
    # truncate
    (tmp_path / "optimizer.pt").write_bytes((tmp_path / "optimizer.pt").read_bytes()[:10])
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(tmp_path)
    (tmp_path / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest"):
        load_training_state(tmp_path)


@pytest.mark.parametrize("crash_at", range(5))
def test_crash_during_save_never_yields_a_partial_checkpoint(tmp_path, monkeypatch, crash_at):
    """Atomic checkpoints: die at each phase of a save (4 files, then the manifest): the resolver skips the
    half-written checkpoint and returns the previous good one."""
    import raytune_llama.engine.checkpoint as ckpt

    good, partial = tmp_path / "checkpoint_1", tmp_path / "checkpoint_2"
    save_training_state(good, model={"w": torch.ones(3)}, optimizer={}, meta={"step": 1})
    calls = {"n": 0}
    real_replace = os.replace

    def dying_replace(src, dst):
        if calls["n"] == crash_at:
            raise KeyboardInterrupt("killed")  # the process dies here
        calls["n"] += 1
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(partial, model={"w": torch.zeros(3)}, optimizer={}, meta={"step": 2})
    monkeypatch.undo()
    chosen, refused = ckpt.newest_valid_checkpoint([partial, good])
    assert chosen == good and len(refused) == 1 and "manifest" in refused[0]
    assert load_training_state(chosen)["meta"]["step"] == 1


def test_resume_policy_is_checked_on_the_driver(tmp_path):
    """Exact resume: resume=must with nothing saved, and resume=never over saved checkpoints, are
    errors before anything starts; resume=auto with nothing saved starts fresh."""
    from raytune_llama.config import ConfigError, load_config
    from raytune_llama.trainer.llama_trainer import LlamaTrainer
    from tests.unit.test_config import TINY

    def trainer(resume):
        return LlamaTrainer(load_config(TINY, [f"run.storage_path={tmp_path}", "run.name=r",
                                               f"checkpoint.resume={resume}", f"model.name_or_path={tmp_path}/m"]))

    trainer("auto")._check_resume_policy()
    with pytest.raises(ConfigError, match="'must' but .* has no checkpoint"):
        trainer("must")._check_resume_policy()
    (tmp_path / "r" / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    trainer("must")._check_resume_policy()
    with pytest.raises(ConfigError, match="'never' but .* already holds 1 checkpoint"):
        trainer("never")._check_resume_policy()
