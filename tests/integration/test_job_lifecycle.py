"""A finetune job's life on the session's head node (token auth on), with the commands a user
types: `ray job submit --no-wait`, `ray job logs`, a stop once a checkpoint exists (through the
job server's API, as `ray job stop` does; the job ends STOPPED), then the same command submitted again resumes from that checkpoint
and runs to the end (SUCCEEDED, summary.json says the last step)."""
import json
import re
import subprocess
import time
import uuid

import pytest

from tests.integration.conftest import RAY, REPO

pytestmark = pytest.mark.integration

# Steps of 25-100 ms (seq 64, 4 sequences; more when the 2 cores are busy) with a checkpoint
# (~0.2 s) every 10: 5-20 s of training in all, split over the two jobs. The stopped job still
# has most of its steps ahead when its first checkpoint appears, so the stop (an API call, not
# the CLI, which takes seconds to start on a busy machine) lands mid-run; the test says so if it
# ever does not.
MAX_STEPS = 200
STEP_LINE = re.compile(rf"^step +(\d+)/{MAX_STEPS} \| loss [0-9.]+", re.M)


def small_corpus(tmp_path, lines: int = 300):
    src = (REPO / "examples" / "data" / "tiny_corpus.jsonl").read_text().splitlines(keepends=True)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(src[:lines]))
    return path


def ray_job(ray_head, command, *args, timeout=120):
    """`ray job COMMAND --address DASHBOARD ARGS...` with the head's token in the environment."""
    return subprocess.run([RAY, "job", command, "--address", ray_head.dashboard_url, *args],
                          env=ray_head.env, capture_output=True, text=True, timeout=timeout)


def latest_checkpoint_step(run_dir):
    """Step of the checkpoint Ray Train resumes from (its checkpoint manager snapshot)."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    if not snap.is_file():
        return None
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
    except json.JSONDecodeError:  # being rewritten right now
        return None
    if not latest or not (run_dir / latest["checkpoint_dir_name"]).is_dir():
        return None
    return latest["metrics"]["step"]


def resumable_step(run_dir):
    """Step the next run resumes from: the newest complete checkpoint on storage, the one Ray
    Train registered or a newer one it had not registered yet when the job was stopped."""
    from raytune_llama.engine.checkpoint import newest_valid_checkpoint

    chosen, _ = newest_valid_checkpoint(sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), reverse=True))
    return json.loads((chosen / "meta.json").read_text())["step"] if chosen else None


def test_stop_then_resubmit_resumes(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(ray_head.dashboard_url)
    run_dir = tmp_path / "runs" / "lifecycle"
    finetune = [
        "raytune-llama", "finetune", "examples/configs/tiny_cpu.yaml",
        "--set", f"train.max_steps={MAX_STEPS}", "--set", "checkpoint.every_steps=10",
        "--set", "data.seq_len=64", "--set", "train.global_batch_size=4",
        "--set", f"data.path={small_corpus(tmp_path)}",
        "--set", f"run.storage_path={tmp_path}/runs", "--set", "run.name=lifecycle",
        "--set", f"model.name_or_path={tmp_path}/models/tiny-llama",
    ]
    first, second = (f"lifecycle-{uuid.uuid4().hex[:8]}-{i}" for i in (1, 2))

    def submit(job_id):
        res = ray_job(ray_head, "submit", "--working-dir", str(REPO), "--submission-id", job_id,
                      "--no-wait", "--", *finetune, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]

    # 1. Submit and wait for the first checkpoint in the run directory. The deadlines here only
    # turn a hang into a failure: a loaded machine may take minutes, which is not checked.
    submit(first)
    deadline = time.time() + 900
    while latest_checkpoint_step(run_dir) is None:
        status = jobs.get_job_status(first)
        assert status in (JobStatus.PENDING, JobStatus.RUNNING), (
            f"job {first} is {status} before its first checkpoint:\n{jobs.get_job_logs(first)[-4000:]}")
        assert time.time() < deadline, f"no checkpoint after 900 s:\n{jobs.get_job_logs(first)[-4000:]}"
        time.sleep(0.2)

    # 2. Stop it mid-run, through the job server's API (what `ray job stop` calls): the CLI needs
    # seconds to start on a loaded 2-core machine, long enough for the run to reach its end.
    assert jobs.stop_job(first), jobs.get_job_logs(first)[-4000:]
    deadline = time.time() + 600
    while not jobs.get_job_status(first).is_terminal():
        assert time.time() < deadline, f"job {first} still running 600 s after stop_job"
        time.sleep(0.2)
    assert jobs.get_job_status(first) == JobStatus.STOPPED, jobs.get_job_logs(first)[-4000:]
    # The job is STOPPED once its driver is gone; its Ray Train workers die with their owner a
    # moment later and may still commit a checkpoint (seen on a loaded machine: one more, 10 steps
    # on). Measure what the next run resumes from once no training worker is left.
    from raytune_llama.testing.fault_injection import alive_worker_pids

    deadline = time.time() + 600
    while alive_worker_pids(ray_head.gcs_address):
        assert time.time() < deadline, "training workers still alive 600 s after the job stopped"
        time.sleep(0.5)
    registered, resume_from = latest_checkpoint_step(run_dir), resumable_step(run_dir)
    assert resume_from is not None and registered <= resume_from < MAX_STEPS, (registered, resume_from)
    logs1 = ray_job(ray_head, "logs", first).stdout
    steps1 = [int(s) for s in STEP_LINE.findall(logs1)]
    assert steps1 and steps1[0] == 1, logs1[-4000:]  # (the last lines printed may trail the checkpoint)
    # The run report is written at every checkpoint: the stopped run left one, short of the end.
    partial = json.loads((run_dir / "summary.json").read_text())
    assert partial["final_step"] < MAX_STEPS and partial["checkpoint"] is None, partial
    assert (run_dir / "loss.png").is_file() and (run_dir / "steps.jsonl").is_file()

    # 3. The same command again: resumes after the checkpoint and runs to the end.
    submit(second)
    follow = ray_job(ray_head, "logs", "--follow", second, timeout=1800)  # a hang guard only
    logs2 = follow.stdout
    assert jobs.get_job_status(second) == JobStatus.SUCCEEDED, logs2[-4000:]
    steps2 = [int(s) for s in STEP_LINE.findall(logs2)]
    assert steps2 and steps2[0] == resume_from + 1 and steps2[-1] == MAX_STEPS, (resume_from, logs2[-4000:])
    assert f"run lifecycle: steps {resume_from + 1}..{MAX_STEPS} of {MAX_STEPS}" in logs2, logs2[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == MAX_STEPS
    assert (run_dir / "export" / "model.safetensors").is_file()
