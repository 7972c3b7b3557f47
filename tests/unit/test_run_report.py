"""write_run_report: summary.json keeps every key; loss.png is a real, non-blank image."""
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from raytune_llama.trainer.run_report import write_run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_records(n: int = 200, resize_at: int = 120) -> list[dict]:
    """A noisy decaying loss and a throughput that doubles when the run grows from 4 to 8 devices."""
    rng = np.random.default_rng(0)
    out = []
    for step in range(1, n + 1):
        world = 4 if step < resize_at else 8
        tput = 1000.0 * world * (0.6 if step == 1 else 1.0) + rng.normal(0, 50)
        out.append({"step": step, "loss": 2.0 + 8.0 * math.exp(-step / 40) + rng.normal(0, 0.15),
                    "lr": 1e-3, "grad_norm": 1.0, "step_time_s": 2048 / tput, "tokens_per_s": tput,
                    "tokens_seen": 2048 * step, "world_size": world, "predicted_step_time_s": 2048 / (1100.0 * world)})
    return out


def check_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        width, height = img.size
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert 600 <= width <= 3000 and 400 <= height <= 3000, (width, height)
    return pixels


def test_report_writes_summary_and_plot(tmp_path):
    records = synthetic_records()
    summary = {"run_name": "llama3-70b-mi250", "layout": "dp_shard=8,pp=8,mbs=1", "final_loss": records[-1]["loss"],
               "steps": [r["step"] for r in records], "checkpoint": tmp_path / "ck", "export_path": None}
    paths = write_run_report(tmp_path / "run", summary, list(reversed(records)))  # order must not matter
    assert paths == {"summary": tmp_path / "run" / "summary.json", "plot": tmp_path / "run" / "loss.png"}
    saved = json.loads(paths["summary"].read_text())
    assert set(saved) == set(summary)
    assert saved["steps"] == summary["steps"] and saved["checkpoint"] == str(tmp_path / "ck")
    pixels = check_png(paths["plot"])
    assert pixels.std() > 10  # lines, text and axes drawn, not a blank canvas
    assert paths["plot"].stat().st_size > 20_000
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_report_with_no_steps_and_missing_optional_keys(tmp_path):
    write_run_report(tmp_path, {"run_name": "empty"}, [])
    check_png(tmp_path / "loss.png")
    partial = [{"step": s, "loss": float("nan") if s == 3 else 1.0 / s, "tokens_per_s": 10.0 * s} for s in range(1, 6)]
    write_run_report(tmp_path, {"run_name": "partial"}, partial)
    check_png(tmp_path / "loss.png")
    assert json.loads((tmp_path / "summary.json").read_text()) == {"run_name": "partial"}
