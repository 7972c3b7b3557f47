"""Interactive Ray client session (`ray.init("ray://...")`) against the session's head node
(token auth on): examples/ray_client_session.py plans the 70B-on-64-MI250 case in the client
and fits the tiny config on the cluster through `fit_remote`."""
import json
import re
import subprocess
import time
import sys

import pytest

from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration


def small_corpus(tmp_path, lines: int = 300):
    """The first documents of the bundled corpus: tokenizing them takes a fraction of a second."""
    src = (REPO / "examples" / "data" / "tiny_corpus.jsonl").read_text().splitlines(keepends=True)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(src[:lines]))
    return path


def test_ray_client_session_plans_and_fits(ray_head, tmp_path):
    assert ray_head.client_port
    cmd = [
        sys.executable, str(REPO / "examples" / "ray_client_session.py"),
        "--address", ray_head.client_address, "--json",
        "--set", f"data.path={small_corpus(tmp_path)}", "--set", "data.seq_len=64",
        "--set", "train.global_batch_size=4", "--set", "train.max_steps=3",
        "--set", "checkpoint.every_steps=3", "--set", "run.name=client",
        "--set", f"run.storage_path={tmp_path}/runs",
        "--set", f"model.name_or_path={tmp_path}/models/tiny-llama",
    ]
    # The fixture's env carries RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH: the client connects
    # with the head's token. cwd elsewhere: the example must not depend on the repo being the cwd.
    # Ray's proxier starts one server process per client session; on this 2-core box that start
    # sometimes fails inside Ray ("Starting Ray client server failed", or psutil finding the new
    # process a zombie). Such a connection failure is retried; anything else counts at once.
    for attempt in range(3):
        res = subprocess.run(cmd, env=ray_head.env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=1800)  # a hang guard only
        out = res.stdout + res.stderr
        if res.returncode == 0 or "Initialization failure from server" not in out and \
                "Starting Ray client server failed" not in out:
            break
        time.sleep(3)
    assert res.returncode == 0, out[-4000:]
    assert "client mode: True" in out, out[-4000:]
    # The plan, computed in the client.
    assert "on 8 x 8 mi250 (64 devices); global batch 512 x seq 1024" in out, out[-4000:]
    assert re.search(r"chosen layout: .*tp=\d.* pp=\d", out), out[-4000:]
    # The fit, run on the cluster; its progress lines are streamed back to the client.
    assert re.search(r"step +3/3 \| loss [0-9.]+", out), out[-4000:]
    summary = json.loads(re.search(r"^SUMMARY_JSON (.*)$", out, re.M).group(1))
    assert summary["final_step"] == 3 and summary["steps"] == [1, 2, 3]
    assert summary["final_loss"] < summary["first_loss"]
    run_dir = tmp_path / "runs" / "client"
    assert json.loads((run_dir / "summary.json").read_text())["final_step"] == 3
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_fit_remote_refuses_relative_paths():
    """fit_remote runs on a cluster node: a relative path would resolve in the remote worker's
    cwd, so it is refused on the client, with the field named, before anything is submitted."""
    from raytune_llama.config import ConfigError, load_config
    from raytune_llama.trainer.remote_fit import fit_remote

    cfg = load_config(REPO / "examples" / "configs" / "tiny_cpu.yaml")
    with pytest.raises(ConfigError) as err:
        fit_remote(cfg)
    text = str(err.value)
    assert "data.path" in text and "run.storage_path" in text and "absolute" in text
