"""CLI: plan/estimate/calibrate in-process; JSON shape; errors; the planner imports no torch/ray."""
import argparse
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytune_llama.cli import plan_commands

ROOT = Path(__file__).resolve().parents[2]
WL = ["--seq-len", "1024", "--global-batch", "512"]


def run_cli(argv):
    """Run a plan/estimate/calibrate command in-process; returns (exit code, stdout, stderr)."""
    ap = argparse.ArgumentParser()
    plan_commands.register(ap.add_subparsers())
    args = ap.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


def test_plan_json_has_contract_keys():
    code, out, _ = run_cli(["plan", "--model", "llama3-70b", "--hardware", "mi250", "--nodes", "8",
                            "--devices-per-node", "8", *WL, "--json"])
    d = json.loads(out)
    assert code == 0
    for key in ("plan", "memory_per_device_bytes", "step_time_s", "tokens_per_s", "mfu", "alternatives", "rejected"):
        assert key in d
    for key in ("dp_replicate", "dp_shard", "zero_stage", "tp", "pp", "pp_schedule", "virtual_stages",
                "micro_batch_size", "grad_accum", "recompute", "offload", "backend"):
        assert key in d["plan"]


def test_plan_text_and_cluster_yaml():
    code, out, _ = run_cli(["plan", "--model", "llama3-70b", "--cluster", str(ROOT / "cluster" / "mi250.yaml"), *WL])
    assert code == 0
    for words in ("chosen layout", "memory per device", "MFU", "alternatives", "rejected", "dominant"):
        assert words in out


def test_estimate_and_errors():
    code, out, _ = run_cli(["estimate", "--model", "llama3-70b", "--hardware", "mi250", "--nodes", "8", *WL,
                            "--layout", "dp_shard=32,tp=2,zero_stage=3,micro_batch_size=16,recompute=full", "--json"])
    assert code == 0 and json.loads(out)["feasible"]
    code, out, _ = run_cli(["estimate", "--model", "llama3-70b", "--hardware", "mi250", "--nodes", "8", *WL,
                            "--layout", "dp_shard=8,pp=8,micro_batch_size=1,recompute=full", "--json"])
    assert code == 1 and not json.loads(out)["feasible"]  # out of memory: FSDP2 under pipelining
    code, out, _ = run_cli(["plan", "--model", "tiny-llama", "--hardware", "cpu", "--devices-per-node", "2",
                            "--seq-len", "128", "--global-batch", "8", "--compute-dtype", "fp32", "--json"])
    assert code == 0 and json.loads(out)["workload"]["compute_dtype"] == "fp32"
    code, _, err = run_cli(["plan", "--model", "tiny-llama", "--hardware", "cpu", "--seq-len", "128",
                            "--global-batch", "8", "--compute-dtype", "fp16"])
    assert code == 2 and "compute_dtype='fp16'" in err and "--compute-dtype" in err
    code, _, err = run_cli(["plan", "--model", "llama3-70b", "--hardware", "mi999", *WL])
    assert code == 2 and "hardware='mi999'" in err and "fix:" in err
    code, _, err = run_cli(["plan", "--model", "llama3-70b", "--hardware", "h100", "--seq-len", "0", "--global-batch", "8"])
    assert code == 2 and "seq_len=0" in err


def test_calibrate_roundtrip(tmp_path):
    base = {"model": "llama3-8b", "hardware": "mi250", "nodes": 1, "devices_per_node": 8, "seq_len": 2048,
            "global_batch": 32}
    layouts = ["dp_shard=8,micro_batch_size=1,recompute=full", "dp_shard=8,micro_batch_size=2,recompute=selective"]
    from raytune_llama.planner.api import estimate
    runs = []
    for lay in layouts:
        e = estimate("llama3-8b", {"hardware": "mi250", "nodes": 1}, {"global_batch": 32, "seq_len": 2048}, layout=lay)
        runs.append({**base, "layout": lay, "measured_step_time_s": e.time.step_time * 1.4,
                     "measured_peak_memory_bytes": e.memory.total * 1.1})
    res = tmp_path / "results.json"
    res.write_text(json.dumps(runs))
    out_yaml = tmp_path / "cal.yaml"
    code, out, _ = run_cli(["calibrate", str(res), "--out", str(out_yaml), "--json"])
    rep = json.loads(out)
    assert code == 0 and rep["step_time_error_pct_after"] < rep["step_time_error_pct_before"] / 3
    assert rep["memory_error_pct_after"] < rep["memory_error_pct_before"]
    assert yaml.safe_load(out_yaml.read_text())["efficiency"]["matmul_max"] < 0.55
    code, out, _ = run_cli(["estimate", "--model", "llama3-8b", "--hardware", "mi250", "--profile", str(out_yaml),
                            "--seq-len", "2048", "--global-batch", "32", "--layout", layouts[0], "--json"])
    assert json.loads(out)["step_time_s"] == pytest.approx(runs[0]["measured_step_time_s"], rel=0.1)


def test_planner_never_imports_torch_ray_deepspeed():
    pattern = re.compile(r"^\s*(import|from)\s+(torch|ray|deepspeed)\b", re.M)
    files = list((ROOT / "raytune_llama" / "planner").rglob("*.py")) + [ROOT / "raytune_llama" / "cli" / "plan_commands.py"]
    assert files and not [f for f in files if pattern.search(f.read_text())]
    code = ("import sys, raytune_llama.cli.plan_commands as p; "
            "print([m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
