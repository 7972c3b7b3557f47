"""`raytune-llama finetune` against the shared Ray head prints our own lines, the progress
lines and the summary, and nothing of Ray's or the workers' internals (raytune_llama/console.py);
the driver's library log records go to RUN_DIR/logs/driver.log."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "raytune-llama")


def test_finetune_console_is_quiet_by_default(ray_head, tmp_path):
    res = subprocess.run(
        [CLI, "finetune", str(REPO / "examples" / "configs" / "tiny_cpu.yaml"), "--address", ray_head.gcs_address,
         "--set", f"model.name_or_path={tmp_path}/models/tiny-llama",
         "--set", f"data.path={REPO}/examples/data/tiny_corpus.jsonl", "--set", f"run.storage_path={tmp_path}/runs",
         "--set", "run.name=quiet", "--set", "train.max_steps=3", "--set", "train.global_batch_size=8",
         "--set", "data.seq_len=64", "--set", "train.warmup_steps=1", "--set", "checkpoint.every_steps=3"],
        env=ray_head.env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    lines = [ln for ln in out.splitlines() if ln.strip()]
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert len(steps) == 3, out[-4000:]
    # Our own lines, the summary and the logs line; no "(RayTrainWorker pid=...)" engine details,
    # Ray banners, Ray Data notices or Ray Train bookkeeping.
    assert any(ln.startswith("[raytune_llama] layout") for ln in lines), out[-4000:]
    assert any(ln.startswith("run quiet: steps 1..3 of 3") for ln in lines), out[-4000:]
    log_file = tmp_path / "runs" / "quiet" / "logs" / "driver.log"
    assert any(ln.startswith("  logs ") and str(log_file) in ln for ln in lines), out[-4000:]
    # (A cluster joined with --address keeps Ray Train's preemption watcher, and with it the
    # controller's one core_worker line about it per worker-group start: console.py.)
    for noise in ("engine: ", "sharded load", "Connected to Ray cluster", "Progress bars disabled",
                  "Token authentication"):
        assert noise not in out, (noise, out[-4000:])
    assert log_file.is_file()
