"""`raytune-llama sweep` submitted with `ray job submit` to the shared Ray head: 4 trials of the
tiny chat SFT config, ASHA on the validation loss stops the hopeless ones early, the best config
is printed and its checkpoint loads into an engine (docs/tune.md)."""
import json
import os
import re
import subprocess

import pytest

from tests.integration.conftest import RAY, REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEPS = 8


@pytest.fixture(scope="module")
def sweep(ray_head, tmp_path_factory):
    """Submitted as a user would: `ray job submit -- raytune-llama sweep ...` to the head's job server."""
    tmp = tmp_path_factory.mktemp("sweep")
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", str(REPO), "--no-wait", "--",
         "raytune-llama", "sweep", "examples/configs/tiny_chat.yaml",
         # in grid order: a learning rate that learns, two that cannot in 8 steps, one more that learns
         "--param", "train.lr=grid:3e-3,1e-7,1e-6,1e-3", "--samples", "1", "--scheduler", "asha", "--json",
         "--set", f"model.name_or_path={tmp}/models/tiny-llama", "--set", f"run.storage_path={tmp}/runs",
         "--set", f"train.max_steps={STEPS}", "--set", "train.eval_every_steps=2", "--set", "train.eval_max_batches=2",
         "--set", "train.global_batch_size=8", "--set", "train.warmup_steps=1", "--set", "checkpoint.every_steps=4",
         "--set", "checkpoint.keep_best=null"],
        env=ray_head.env, capture_output=True, text=True, timeout=1800)  # a hang guard only
    assert submit.returncode == 0, submit.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    logs = subprocess.run([RAY, "job", "logs", "--follow", "--address", ray_head.dashboard_url, job_id],
                          env=ray_head.env, capture_output=True, text=True, timeout=900).stdout
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(ray_head.dashboard_url).get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-4000:]
    report = next(line for line in reversed(logs.splitlines()) if line.startswith('{"metric"'))
    return tmp, json.loads(report)


def test_asha_stops_hopeless_trials_and_names_the_best(sweep):
    tmp, report = sweep
    trials = report["trials"]
    assert len(trials) == 4 and report["metric"] == "eval_loss"
    by_lr = {t["params"]["train.lr"]: t for t in trials}
    assert any(t["status"] == "stopped early" for t in trials), [(t["params"], t["status"], t["steps"]) for t in trials]
    assert by_lr[1e-7]["status"] == "stopped early" and by_lr[1e-7]["steps"] < STEPS
    best = report["best"]
    assert best["params"]["train.lr"] in (3e-3, 1e-3) and best["status"] == "finished"
    assert best["eval_loss"] == min(t["eval_loss"] for t in trials if t["status"] == "finished")
    out_dir = tmp / "runs" / "tiny-chat-sweep"
    assert (out_dir / "results.csv").is_file() and (out_dir / "loss_curves.png").stat().st_size > 10_000


def test_the_best_trials_checkpoint_loads(sweep):
    import torch.distributed as dist

    from raytune_llama.engine.checkpoint_io import load_engine_checkpoint
    from raytune_llama.engine.model_io import build_engine
    from raytune_llama.planner.plan import ParallelPlan

    tmp, report = sweep
    checkpoint = report["best"]["checkpoint"]
    assert checkpoint and os.path.isdir(checkpoint)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29571", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    engine = build_engine(str(tmp / "models" / "tiny-llama"), ParallelPlan(micro_batch_size=8), device_type="cpu",
                          lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), max_grad_norm=1.0, mixed_precision=None)
    try:
        meta = load_engine_checkpoint(engine, checkpoint)
        assert meta["step"] == STEPS
    finally:
        engine.close()
        if dist.is_initialized():
            dist.destroy_process_group()
