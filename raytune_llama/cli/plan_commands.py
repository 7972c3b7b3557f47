"""`raytune-llama plan | estimate | calibrate`: the planner on the command line (no torch/ray import;
`plan --verify` alone imports the engine, to dry-run the chosen layout).

    raytune-llama plan --model llama3-70b --hardware mi250 --nodes 8 --seq-len 1024 --global-batch 512
    raytune-llama estimate --model llama3-70b --hardware mi250 --nodes 8 --seq-len 1024 \
        --global-batch 512 --layout "dp_shard=8,pp=8,micro_batch_size=1,recompute=full"
    raytune-llama calibrate RESULTS.json --out mi250-calibrated.yaml
    raytune-llama plan --model llama3-70b --hardware mi250 --nodes 1 --seq-len 1024 --global-batch 64 \
        --lora-rank 16 [--lora-targets q_proj,v_proj] [--packing documents]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from raytune_llama.lora_settings import ALL_LINEAR
from raytune_llama.planner.api import estimate, plan
from raytune_llama.planner.calibrate import calibrate, load_results, write_profile
from raytune_llama.planner.cluster import ClusterSpec, from_ray_launcher_yaml, make_cluster
from raytune_llama.planner.errors import PlanError
from raytune_llama.planner.workload import PACKING_TO_MASK, make_workload


def _workload_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name (e.g. llama3-70b), config.json or model dir")
    p.add_argument("--hardware", help="hardware profile (mi250, mi250x, mi300x, h100, h200, a100-80gb, cpu)")
    p.add_argument("--nodes", type=int, help="number of nodes (default 1, or from --cluster)")
    p.add_argument("--devices-per-node", type=int, help="devices per node (default: the profile's)")
    p.add_argument("--cluster", help="Ray cluster launcher YAML to read nodes/devices/hardware from")
    p.add_argument("--profile", help="profile YAML adding or overriding a hardware kind (e.g. from calibrate)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--optimizer", default="adamw",
                   help="adamw (fp32 master weights and moments, default) | adamw_bf16 (pure bf16)")
    p.add_argument("--compute-dtype", default="bf16",
                   help="forward/backward dtype: bf16 (accelerators, default) | fp32 (CPU runs, no autocast)")
    p.add_argument("--tp", type=int, help="fix the tensor-parallel degree")
    p.add_argument("--pp", type=int, help="fix the pipeline degree")
    p.add_argument("--no-offload", action="store_true", help="forbid CPU offload of optimizer state")
    p.add_argument("--headroom", type=float, default=0.05, help="fraction of device memory kept free (default 0.05)")
    p.add_argument("--recompute", choices=["none", "selective", "full"], help="fix activation recomputation")
    p.add_argument("--backend", choices=["torch", "deepspeed"], help="fix the backend")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="LoRA adapter rank (train.lora.r): frozen base, only adapters train; 0 = full fine-tuning "
                        "(default)")
    p.add_argument("--lora-targets", default=None,
                   help=f"comma-separated projections that get adapters (train.lora.target_modules; default all: "
                        f"{','.join(ALL_LINEAR)})")
    p.add_argument("--packing", choices=sorted(PACKING_TO_MASK), default=None,
                   help="data.packing: documents (block-diagonal causal mask per packed document; the run's "
                        "default) | naive | none (plain causal mask); default: causal")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _inputs(args: argparse.Namespace) -> tuple[ClusterSpec, Any]:
    if args.cluster:
        c = from_ray_launcher_yaml(args.cluster, args.profile)
        hw = args.hardware or c.hardware.name
        cluster = make_cluster(hw, args.nodes or c.nodes, args.devices_per_node or c.devices_per_node, args.profile)
    else:
        if not args.hardware and not args.profile:
            raise PlanError("hardware", None, "no hardware kind given", "pass --hardware mi250 (or --cluster FILE.yaml)")
        cluster = make_cluster(args.hardware, 1 if args.nodes is None else args.nodes, args.devices_per_node, args.profile)
    wl = make_workload(args.global_batch, args.seq_len, args.optimizer, args.tp, args.pp, not args.no_offload,
                       args.headroom, args.recompute, args.backend, args.compute_dtype, lora_rank=args.lora_rank,
                       lora_targets=args.lora_targets,
                       attention_mask=PACKING_TO_MASK[args.packing] if args.packing else "causal")
    return cluster, wl


def _guard(fn):  # one clear line for every planner error, exit code 2
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except PlanError as exc:
            if getattr(args, "json", False):
                print(json.dumps({"error": str(exc), "field": exc.field, "value": repr(exc.value), "fix": exc.fix}))
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run


@_guard
def cmd_plan(args: argparse.Namespace) -> int:
    """Run `plan`: print the chosen layout, predictions, alternatives and rejects."""
    cluster, wl = _inputs(args)
    res = plan(args.model, cluster, wl)
    if not args.verify:
        print(json.dumps(res.to_dict(), indent=2) if args.json else res.to_text())
        return 0
    # --verify: the chosen layout's one training step under a fake process group (needs torch).
    from raytune_llama.cli.dryrun_command import format_verification, verify_plan

    report = verify_plan(args.model, res.plan, cluster, wl)
    print(json.dumps({**res.to_dict(), "verify": report}, indent=2) if args.json
          else res.to_text() + "\n\n" + format_verification(report))
    return 0


@_guard
def cmd_estimate(args: argparse.Namespace) -> int:
    """Run `estimate`: predictions for one layout, or why it is infeasible (exit 1)."""
    cluster, wl = _inputs(args)
    est = estimate(args.model, cluster, wl, layout=args.layout)
    print(json.dumps(est.to_dict(), indent=2) if args.json else est.to_text())
    return 0 if est.feasible else 1


@_guard
def cmd_calibrate(args: argparse.Namespace) -> int:
    """Run `calibrate`: fit the profile to measured runs and write a profile YAML."""
    hw, report = calibrate(load_results(args.results), args.hardware, args.profile)
    out = args.out or f"{hw.name}-calibrated.yaml"
    write_profile(hw, report, out)
    if args.json:
        print(json.dumps({**report, "profile": out}, indent=2))
    else:
        print(f"calibrated {hw.name} from {report['records']} run(s): step-time error "
              f"{report['step_time_error_pct_before']}% -> {report['step_time_error_pct_after']}%"
              + (f", memory error {report['memory_error_pct_before']}% -> {report['memory_error_pct_after']}%"
                 if report["memory_error_pct_after"] is not None else ""))
        print("fitted: " + ", ".join(f"{k}={v}" for k, v in report["fitted"].items()))
        print(f"wrote {out}; reuse with: raytune-llama plan ... --profile {out}")
    return 0


def register(subparsers: Any) -> None:
    """Add the plan, estimate and calibrate subcommands to an argparse subparsers object."""
    p = subparsers.add_parser("plan", help="choose the fastest parallel layout that fits")
    _workload_flags(p)
    p.add_argument("--verify", action="store_true",
                   help="also dry-run the chosen layout (one rank per pipeline stage, fake process group and "
                        "fake tensors; needs torch, ~1 min per 70B rank) and print its measured memory next to "
                        "the prediction (docs/planner.md, 'How the planner is checked')")
    p.set_defaults(func=cmd_plan)
    e = subparsers.add_parser("estimate", help="predict memory and step time of one layout")
    _workload_flags(e)
    e.add_argument("--layout", required=True, help='e.g. "dp_shard=8,pp=8,micro_batch_size=1,recompute=full"')
    e.set_defaults(func=cmd_estimate)
    c = subparsers.add_parser("calibrate", help="fit a hardware profile to measured runs")
    c.add_argument("results", help="RESULTS.json: list of measured runs (see docs/planner.md)")
    c.add_argument("--hardware", help="which hardware kind to fit when the results mix kinds")
    c.add_argument("--profile", help="starting profile YAML (default: the built-in one)")
    c.add_argument("--out", help="output profile YAML (default: <hardware>-calibrated.yaml)")
    c.add_argument("--json", action="store_true", help="print the fit report as JSON")
    c.set_defaults(func=cmd_calibrate)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry for testing: `python -m raytune_llama.cli.plan_commands plan ...`."""
    ap = argparse.ArgumentParser(prog="raytune-llama")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
