"""End to end on the shared local Ray head: a 2-worker fit whose loss goes down, a stop and
resume that continues at the right step with the same losses, and the exported model."""
import json
import time

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


@pytest.fixture(scope="module")
def straight_run(ray_head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    summary = LlamaTrainer(_cfg(tmp, "straight")).fit()
    return tmp, summary


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
    # The export holds the trained weights: on a line of the training corpus its loss is well
    # below that of the random initialisation the run started from (the run's loss fell by > 1).
    start = AutoModelForCausalLM.from_pretrained(tmp / "models" / "tiny-llama")
    line = json.loads((REPO / "examples" / "data" / "tiny_corpus.jsonl").read_text().splitlines()[0])["text"]
    batch = tok(line, return_tensors="pt")
    with torch.no_grad():
        trained, initial = (float(m(**batch, labels=batch["input_ids"]).loss) for m in (model, start))
    assert trained < initial - 1.0, (trained, initial)
    prompt = "One sunny morning, Ada"
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 12 and torch.equal(out[0, :ids.shape[1]], ids[0])
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith(prompt) and text[len(prompt):].strip(), text  # the prompt, then new words


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


def _final_counters(port: int, run: str, names: set[str]) -> dict[str, float]:
    """The run's counters once they stop changing. Counters (unlike gauges, which leave the
    endpoint seconds after the worker that set them ends) stay on it after the run, so nothing
    here races the run's end; the head exports every second, the scrapes are 3 s apart."""
    from tests.integration.test_metrics import scrape_once, scrape_run

    last = scrape_run(port, run, names)
    deadline = time.monotonic() + 300  # only a hang guard
    while True:
        time.sleep(3)
        now = scrape_once(port, run)
        if names <= set(now) and all(now[n] == last[n] for n in names):
            return now
        assert time.monotonic() < deadline, f"{run}'s counters still changing: {last} -> {now}"
        last = now if names <= set(now) else last


def test_training_metrics_reach_the_prometheus_endpoint(ray_head, straight_run):
    """The real run's per-step metrics (rank 0, ray.util.metrics) reach the head's endpoint:
    its counters, read after the run, hold exactly what its step records say it trained.
    (The gauges' values and tags are checked in test_metrics.py, on an actor that stays alive.)"""
    from raytune_llama.trainer.metrics_export import prometheus_name

    tmp, _ = straight_run
    steps, tokens = prometheus_name("steps"), prometheus_name("step_tokens")
    found = _final_counters(ray_head.metrics_port, "straight", {steps, tokens})
    records = [json.loads(line) for line in (tmp / "runs" / "straight" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert found[steps] == STEPS, found
    assert found[tokens] == pytest.approx(sum(r["tokens_per_s"] * r["step_time_s"] for r in records), rel=1e-9)
