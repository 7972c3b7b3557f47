"""`ray job submit` against the real job server of the session's head node (token auth on):
the same `raytune-llama finetune` command a user submits, waited on until SUCCEEDED."""
import re
import subprocess

import pytest

from tests.integration.conftest import RAY, REPO

pytestmark = pytest.mark.integration


def test_ray_job_submit_runs_finetune(ray_head, tmp_path):
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", str(REPO),
         "--no-wait", "--",
         "raytune-llama", "finetune", "examples/configs/tiny_cpu.yaml",
         "--set", "train.max_steps=6", "--set", "checkpoint.every_steps=3",
         "--set", f"run.storage_path={tmp_path}/runs", "--set", "run.name=submitted",
         "--set", f"model.name_or_path={tmp_path}/models/tiny-llama"],
        env=ray_head.env, capture_output=True, text=True, timeout=900,  # a hang guard only
    )
    assert submit.returncode == 0, submit.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    wait = subprocess.run(
        [RAY, "job", "logs", "--follow", "--address", ray_head.dashboard_url, job_id],
        env=ray_head.env, capture_output=True, text=True, timeout=1800,  # a hang guard only
    )
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(ray_head.dashboard_url).get_job_status(job_id)
    logs = wait.stdout
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "run submitted: steps 1..6 of 6" in logs, logs[-4000:]
    assert re.search(r"step +6/6 \| loss [0-9.]+", logs), logs[-4000:]
    assert (tmp_path / "runs" / "submitted" / "export" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "submitted" / "summary.json").is_file()


def test_job_submit_without_token_is_refused(ray_head):
    """The head keeps token auth on: a client without the token is turned away."""
    env = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "token"
    env["HOME"] = "/nonexistent"  # no ~/.ray/auth_token either
    res = subprocess.run([RAY, "job", "list", "--address", ray_head.dashboard_url], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "token" in (res.stdout + res.stderr).lower()
