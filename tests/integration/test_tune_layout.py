"""`raytune-llama tune-layout` on the shared Ray head: the planner's top 3 layouts of the tiny
model on 2 CPU workers, 3 steps each, as Ray Tune trials of real TorchTrainer runs; the --json
report, the calibrate records, the calibrated profile, and a following run with
`parallel.layout: measured` running the winner (docs/planner.md, "Measuring the best layouts")."""
import contextlib
import io
import json

import pytest

from raytune_llama.cli.main import main
from raytune_llama.planner.calibrate import load_results
from raytune_llama.trainer.llama_trainer import LlamaTrainer
from tests.integration.conftest import REPO
from tests.integration.tiny_run import tiny_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~2.5 min on 2 cores
STEPS = 3


@pytest.fixture(scope="module")
def searched(ray_head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune_layout")
    # The overrides of tiny_run_config, on the command line.
    sets = [f"model.name_or_path={tmp}/models/tiny-llama", f"data.path={REPO}/examples/data/tiny_corpus.jsonl",
            f"run.storage_path={tmp}/runs", "run.name=tl", f"train.max_steps={STEPS}",
            "train.global_batch_size=8", "data.seq_len=64", "train.warmup_steps=2"]
    argv = ["tune-layout", str(REPO / "examples" / "configs" / "tiny_cpu.yaml"), "--top-k", "3",
            "--steps", str(STEPS), "--json", "--calibrate"]
    for s in sets:
        argv += ["--set", s]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return tmp, stdout.getvalue(), code


def test_json_report_has_every_layout_measured(searched):
    tmp, out, code = searched
    report = json.loads(out)  # exactly one JSON object: Ray's and Tune's output went to stderr
    assert code == 0
    trials = report["trials"]
    assert len(trials) == 3 and len({t["layout"] for t in trials}) == 3
    for t in trials:
        assert {"layout", "predicted_step_time_s", "measured_step_time_s", "predicted_memory_bytes",
                "measured_peak_memory_bytes", "status"} <= set(t)
        assert t["status"] == "ok", t
        assert t["measured_step_time_s"] > 0 and t["predicted_step_time_s"] > 0 and t["measured_tokens_per_s"] > 0
        assert t["steps_measured"] == [2, 3]  # after one warm-up step
    assert sorted(t["predicted_rank"] for t in trials) == [1, 2, 3]
    assert sorted(t["measured_rank"] for t in trials) == [1, 2, 3]
    fastest = min(trials, key=lambda t: t["measured_step_time_s"])
    assert report["winner"]["layout"] == fastest["layout"] and report["winner"]["measured_rank"] == 1
    assert -1 <= report["spearman"] <= 1
    cal = report["calibration"]
    assert cal["spearman_after"] is None or -1 <= cal["spearman_after"] <= 1
    # the trials' runs are deleted once measured; Tune's own files stay under the run's storage
    tune_dir = tmp / "runs" / "tl" / "tune_layout"
    assert not (tune_dir / "trials").exists()
    assert any(p.name.startswith("tune-") for p in tune_dir.iterdir())
    searched_report = json.loads((tune_dir / "report.json").read_text())
    assert searched_report["winner"]["layout"] == fastest["layout"]


def test_records_load_with_the_calibrate_loader(searched, tmp_path):
    tmp, _, _ = searched
    tune_dir = tmp / "runs" / "tl" / "tune_layout"
    records = load_results(tune_dir / "records.json")
    assert len(records) == 3 and all(r["hardware"] == "cpu" and r["measured_step_time_s"] > 0 for r in records)
    assert (tune_dir / "profile.yaml").is_file()
    assert main(["calibrate", str(tune_dir / "records.json"), "--out", str(tmp_path / "cal.yaml")]) == 0


def test_following_run_uses_the_measured_layout(searched):
    tmp, _, _ = searched
    winner = json.loads((tmp / "runs" / "tl" / "tune_layout" / "report.json").read_text())["winner"]
    summary = LlamaTrainer(tiny_run_config(tmp, "tl", STEPS, "parallel.layout=measured")).fit()
    assert summary["layout"] == winner["layout"]
    assert summary["steps"] == list(range(1, STEPS + 1))
