"""One real Ray head node per test session, started with `ray start --head` on 127.0.0.1
with token authentication on, 2 logical CPUs (the training workers take all of them, as on
a 2-core machine) and the job server; stopped at the end of the session."""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    env: dict
    temp_dir: str
    metrics_port: int = 0
    """The head's --metrics-export-port: Prometheus text at http://127.0.0.1:PORT/metrics."""
    client_port: int = 0
    """The head's --ray-client-server-port: Ray client sessions connect to ray://127.0.0.1:PORT."""

    @property
    def client_address(self) -> str:
        """ray://127.0.0.1:PORT, for `ray.init(...)` from a Ray client session."""
        return f"ray://127.0.0.1:{self.client_port}"


@pytest.fixture(scope="session")
def ray_head():
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rtl", dir="/tmp")
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    env = {**os.environ, **auth, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_USAGE_STATS_ENABLED": "0",
           # as from an activated virtualenv: jobs find the `raytune-llama` console script
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    gcs_port, dash_port, metrics_port, client_port = free_port(), free_port(), free_port(), free_port()
    cmd = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--num-cpus=2",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
        f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={metrics_port}", "--block",
        # Export application metrics every second (Ray's default is 10 s): a short test run's
        # gauges must reach the endpoint while its workers are alive.
        '--system-config={"metrics_report_interval_ms": 1000}',
    ]
    # --block keeps the head's processes under this one process group, so teardown stops this
    # head only (`ray stop` would stop every Ray cluster on the machine).
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    os.environ.update(auth)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    import ray
    from ray._raylet import Config

    # Ray caches RAY_AUTH_MODE when it is first imported; a test module collected earlier may
    # have imported it already, so re-read the environment (as Ray's own _enable_token_auth does).
    Config.initialize("")

    head = RayHead(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", env, temp_dir, metrics_port,
                   client_port)
    try:
        _wait_for_dashboard(head, proc)
        _connect(head, proc)
        yield head
    finally:
        ray.shutdown()
        _stop_process_group(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_process_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the head's process group (ray start --block shuts its children down), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _connect(head: RayHead, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    """ray.init to the head, retried: on a loaded machine the head's raylet can register with
    its GCS after the dashboard already answers, and until then ray.init finds no node to
    attach to ("No node info found matching attributes")."""
    import ray

    deadline = time.time() + timeout_s
    while True:
        try:
            ray.init(address=head.gcs_address, log_to_driver=False)
            return
        except (ConnectionError, RuntimeError):
            ray.shutdown()
            if proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {proc.returncode}; see {head.temp_dir}/head.log")
            if time.time() > deadline:
                raise
            time.sleep(2)


def _wait_for_dashboard(head: RayHead, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    res = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {proc.returncode}; see {head.temp_dir}/head.log")
        res = subprocess.run([RAY, "job", "list", "--address", head.dashboard_url], env=head.env,
                             capture_output=True, text=True, timeout=60)
        if res.returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError(f"job server at {head.dashboard_url} did not answer: {res.stderr[-2000:] if res else ''}")
