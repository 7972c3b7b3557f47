"""TrainingMetrics recorded inside a Ray actor reach the head node's Prometheus endpoint
(--metrics-export-port) with the run/layout tags and the values that were recorded."""
import http.client
import re
import time
import urllib.request
import uuid

import pytest

from raytune_llama.trainer.metrics_export import METRICS, prometheus_name

pytestmark = pytest.mark.integration

SERIES = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict, float]]:
    """(name, labels, value) of every labelled sample in a Prometheus text page."""
    samples = []
    for line in text.splitlines():
        m = SERIES.match(line)
        if m:
            samples.append((m["name"], dict(LABEL.findall(m["labels"])), float(m["value"])))
    return samples


def scrape_once(port: int, run: str) -> dict[str, float]:
    """This run's series on the endpoint now, name -> value ({} while it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            text = resp.read().decode()
    except (OSError, http.client.HTTPException):
        return {}
    return {name: value for name, labels, value in parse_prometheus(text) if labels.get("run") == run}


def scrape_run(port: int, run: str, wanted: set[str], timeout_s: float = 300) -> dict[str, float]:
    """Poll /metrics until every wanted series of this run is there (Ray flushes every few s).
    The deadline only turns a hang into a failure: how soon the series appear is not checked."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = scrape_once(port, run)
        if wanted <= set(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"missing after {timeout_s}s: {sorted(wanted - set(found))}; found {found}")
        time.sleep(2)


def records(n: int) -> list[dict]:
    """n step records as rank 0 of a 64-device run would produce them."""
    out = []
    for step in range(1, n + 1):
        out.append({"step": step, "loss": 3.0 - 0.1 * step, "lr": 1e-5 * step, "grad_norm": 1.5,
                    "step_time_s": 4.0, "tokens_per_s": 16384.0, "tokens_seen": 65536 * step,
                    "world_size": 64, "mfu": 0.31, "predicted_step_time_s": 3.8,
                    "peak_memory_bytes": 52 * 2**30, "predicted_memory_bytes": 50 * 2**30})
    out[-1].update(eval_loss=2.5, eval_perplexity=12.18)  # a step that evaluated
    out[-1].pop("mfu")  # absent optional keys are skipped, the last value stays
    return out


def test_training_metrics_reach_prometheus(ray_head):
    import ray

    @ray.remote(num_cpus=0)
    class Rank0:
        def record(self, run: str, layout: str, recs: list[dict]) -> int:
            from raytune_llama.trainer.metrics_export import TrainingMetrics

            metrics = TrainingMetrics(run, layout)
            for rec in recs:
                metrics.record(rec)
            return len(recs)

    run = f"metrics-{uuid.uuid4().hex[:8]}"
    actor = Rank0.remote()
    try:
        assert ray.get(actor.record.remote(run, "dp_shard=8,pp=8", records(3)), timeout=60) == 3
        wanted = {prometheus_name(k) for k in METRICS}
        found = scrape_run(ray_head.metrics_port, run, wanted)
    finally:
        ray.kill(actor)
    assert found[prometheus_name("step")] == 3
    assert found[prometheus_name("loss")] == pytest.approx(2.7)
    assert found[prometheus_name("lr")] == pytest.approx(3e-5)
    assert found[prometheus_name("tokens_per_s")] == pytest.approx(16384.0)
    assert found[prometheus_name("tokens_per_s_per_device")] == pytest.approx(256.0)
    assert found[prometheus_name("mfu")] == pytest.approx(0.31)
    assert found[prometheus_name("step_time_s")] == pytest.approx(4.0)
    assert found[prometheus_name("predicted_step_time_s")] == pytest.approx(3.8)
    assert found[prometheus_name("peak_memory_bytes")] == pytest.approx(52 * 2**30)
    assert found[prometheus_name("predicted_memory_bytes")] == pytest.approx(50 * 2**30)
    assert found[prometheus_name("world_size")] == 64
    assert found[prometheus_name("eval_loss")] == pytest.approx(2.5)
    assert found[prometheus_name("eval_perplexity")] == pytest.approx(12.18)
    assert found[prometheus_name("tokens_seen")] == 3 * 65536
    assert found[prometheus_name("steps")] == 3
    assert found[prometheus_name("step_tokens")] == pytest.approx(3 * 16384.0 * 4.0)
