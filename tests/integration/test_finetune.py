"""End to end on the shared local Ray head: a 2-worker fit whose loss goes down, a stop and
resume that continues at the right step with the same losses, and the exported model."""
import threading

import numpy as np
import pytest

from raytune_llama.config import load_config
from raytune_llama.trainer.llama_trainer import LlamaTrainer

pytestmark = pytest.mark.integration

from tests.integration.conftest import REPO  # noqa: E402

STEPS = 16


def _cfg(tmp, name, *extra):
    return load_config(REPO / "examples" / "configs" / "tiny_cpu.yaml", [
        f"model.name_or_path={tmp}/models/tiny-llama", f"data.path={REPO}/examples/data/tiny_corpus.jsonl",
        f"run.storage_path={tmp}/runs", f"run.name={name}", f"train.max_steps={STEPS}",
        "train.warmup_steps=2", "checkpoint.every_steps=4", "train.log_every=4", *extra,
    ])


class MetricsScraper(threading.Thread):
    """Scrapes the head's Prometheus endpoint while a run is going (gauges of a finished
    worker process disappear from the endpoint) and keeps the last values of the run's series."""

    def __init__(self, port: int, run: str):
        super().__init__(daemon=True)
        self.port, self.run_name, self.found, self.done = port, run, {}, threading.Event()

    def run(self) -> None:
        from tests.integration.test_metrics import scrape_run

        while not self.done.is_set():
            self.found.update(scrape_run(self.port, self.run_name, set(), timeout_s=1))
            self.done.wait(1.0)


@pytest.fixture(scope="module")
def straight_run(ray_head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    scraper = MetricsScraper(ray_head.metrics_port, "straight")
    scraper.start()
    summary = LlamaTrainer(_cfg(tmp, "straight")).fit()
    scraper.done.set()
    scraper.join(timeout=30)
    return tmp, dict(summary, scraped_metrics=scraper.found)


def test_two_worker_fit_loss_goes_down(straight_run):
    _, s = straight_run
    assert s["steps"] == list(range(1, STEPS + 1)) and s["world_size"] == 2
    assert np.mean(s["losses"][-4:]) < s["losses"][0] - 1.0, s["losses"]
    assert s["mean_tokens_per_s"] > 0 and s["tokens_seen"] > 0


def test_stop_and_resume_matches_uninterrupted_run(straight_run):
    tmp, straight = straight_run
    first = LlamaTrainer(_cfg(tmp, "resumed", "train.stop_after_steps=6")).fit()
    assert first["steps"] == list(range(1, 7)) and first["export_path"] is None
    second = LlamaTrainer(_cfg(tmp, "resumed", "checkpoint.resume=must")).fit()
    assert second["steps"] == list(range(7, STEPS + 1))  # continued from the checkpoint at step 6
    resumed = first["losses"] + second["losses"]
    np.testing.assert_allclose(resumed, straight["losses"], rtol=1e-5)
    assert second["tokens_seen"] == straight["tokens_seen"]
    # Written in place and registered without a copy (trainer/checkpoint_report.py), yet Ray
    # Train still deletes all but checkpoint.keep_last (2) of them; none is half-written.
    kept = sorted(p for p in (tmp / "runs" / "resumed").glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(kept) <= 2 and all((k / "MANIFEST.json").is_file() for k in kept), kept


def test_exported_model_loads_and_generates(straight_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, s = straight_run
    model = AutoModelForCausalLM.from_pretrained(s["export_path"])
    tok = AutoTokenizer.from_pretrained(s["export_path"])
    ids = tok("One sunny morning, Ada", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 12
    text = tok.decode(out[0][ids.shape[1]:])
    assert isinstance(text, str) and text.strip()


def test_run_report_spans_the_resume(straight_run):
    import json

    tmp, _ = straight_run
    run_dir = tmp / "runs" / "resumed"
    steps = [json.loads(line)["step"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["layout"].startswith("dp_replicate=2") and summary["mean_mfu"] > 0
    assert summary["predicted_step_time_s"] > 0
    assert (run_dir / "loss.png").stat().st_size > 10_000


def test_training_metrics_reach_the_prometheus_endpoint(straight_run):
    """The real run's per-step metrics (rank 0, ray.util.metrics) were on the head's endpoint
    while it trained."""
    from raytune_llama.trainer.metrics_export import prometheus_name

    wanted = {prometheus_name(k) for k in ("loss", "tokens_per_s", "mfu", "step_time_s", "world_size")}
    found = straight_run[1]["scraped_metrics"]
    assert wanted <= set(found), sorted(found)
    assert 0 < found[prometheus_name("loss")] < 7 and found[prometheus_name("tokens_per_s")] > 100
    assert 0 < found[prometheus_name("mfu")] < 1 and found[prometheus_name("world_size")] == 2
