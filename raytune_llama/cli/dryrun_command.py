"""`raytune-llama dryrun`: one training step of the layout a run would use, for chosen ranks of
its world, on this CPU under a fake process group and fake tensors (engine/dryrun/), printed per
pipeline stage next to the planner's memory prediction (docs/planner.md, "How the planner is
checked").

    raytune-llama dryrun examples/configs/llama3_70b_mi250.yaml --rank 0
    raytune-llama dryrun CONFIG.yaml --set parallel.layout="dp_shard=8,zero_stage=3" \
        --world-size 8 --nodes 1 --devices-per-node 8 --all-stages --json

The model's config.json comes from the local folder or the HF cache; a hub id that is not cached
falls back to the planner's registry entry of the same model (planner/registry/*.json), so no
weights are ever needed. Each rank is dry-run in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raytune_llama.config import ConfigError, load_config

GIB = 2**30
# Rows of the per-stage table: planner term(s) -> measured category (engine/dryrun/run.py CATEGORY_MAP).
COMPARED = (
    ("params", ("params",), "params"),
    ("grads", ("grads",), "grads"),
    ("optimizer", ("optimizer",), "optimizer"),
    ("fsdp_buffers", ("fsdp_buffers",), "fsdp_buffers"),
    ("activations+logits", ("activations", "logits", "comm_buffers"), "activations"),
)


def register(subparsers: Any) -> None:
    """Add the dryrun subcommand."""
    p = subparsers.add_parser("dryrun", help="one training step of the planned layout under a fake process group: "
                                              "measured memory per stage next to the planner's prediction")
    p.add_argument("config", help="YAML config (the run's model, data.seq_len, parallel.*)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--world-size", type=int, help="ranks in the world (default parallel.num_workers)")
    p.add_argument("--nodes", type=int, help="nodes the world is spread over (default: world size / devices per node)")
    p.add_argument("--devices-per-node", type=int,
                   help="devices per node (default: world size / --nodes, else the hardware profile's node size)")
    p.add_argument("--hardware", help="planner hardware profile (default parallel.hardware)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--rank", type=int, action="append", help="dry-run this global rank (repeatable)")
    which.add_argument("--all-stages", action="store_true",
                       help="one rank per pipeline stage (the default): stages hold different layers")
    p.add_argument("--explain", type=int, default=0, metavar="N",
                   help="also list the N largest groups of tensors the step created that are live at its peak "
                        "(by phase, module and op)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


REGISTRY_ALIASES = {
    # hub ids whose registry entry has another _name_or_path spelling
    "meta-llama/llama-3-70b": "llama3-70b", "meta-llama/llama-3.1-70b": "llama3-70b",
    "meta-llama/llama-3-8b": "llama3-8b", "meta-llama/llama-3.1-8b": "llama3-8b",
}


def registry_config(name_or_path: str) -> dict | None:
    """The planner registry's HF config for a registry name or a hub id, or None."""
    from raytune_llama.planner.model_spec import registry_entry, registry_names

    key = name_or_path.lower()
    name = REGISTRY_ALIASES.get(key, key)
    for stem in registry_names():
        data = registry_entry(stem)
        if stem == name or str(data.get("_name_or_path", "")).lower() == key:
            return data
    return None


def model_config(name_or_path: str) -> tuple[dict, str]:
    """(config.json dict, where it came from): local folder, HF cache, or the planner registry."""
    from raytune_llama.engine.hf_cache import ModelNotFoundError, resolve_pretrained

    try:
        folder = resolve_pretrained(name_or_path)
        return json.loads((Path(folder) / "config.json").read_text()), str(folder)
    except ModelNotFoundError as exc:
        data = registry_config(name_or_path)
        if data is None:
            raise ConfigError([f"model.name_or_path: {name_or_path!r} is not cached and has no planner registry entry "
                               f"({exc}); give a local model folder (only config.json is read)"]) from exc
        return data, f"planner registry ({name_or_path} is not in the local HF cache)"


def stage_ranks(plan, requested: list[int] | None) -> list[int]:
    """The ranks to dry-run: those requested, else the first rank of every pipeline stage."""
    if requested:
        bad = [r for r in requested if not 0 <= r < plan.world_size]
        if bad:
            raise ConfigError([f"--rank: {bad} outside 0..{plan.world_size - 1} (world size {plan.world_size})"])
        return list(requested)
    # Mesh axes dp_replicate, dp_shard, pp, tp (tp innermost): stage s starts at rank s * tp.
    return [s * plan.tp for s in range(plan.pp)]


def compare(result: dict) -> list[tuple[str, float, float]]:
    """(row, predicted bytes, measured bytes) for the table, ending with the tensor totals."""
    pred, meas = result["predicted_bytes"], result["measured_peak_bytes"]
    rows = [(label, sum(pred[t] for t in terms), meas[m]) for label, terms, m in COMPARED]
    rows.append(("tensor total", pred["tensor_total"], meas["total"]))
    return rows


def format_stage(result: dict) -> str:
    """One stage's table: category, predicted GiB, measured GiB, ratio."""
    pred = result["predicted_bytes"]
    lines = [f"rank {result['rank']} (pipeline stage {result['pp_stage']}), family {pred['state_family']}, "
             f"predicted peak at: {pred['phase']}; build {result['build_s']:.1f} s, step {result['step_s']:.1f} s",
             f"  {'category':<20}{'predicted GiB':>15}{'measured GiB':>15}{'measured/pred':>15}"]
    for label, p, m in compare(result):
        ratio = f"{m / p:.2f}" if p else "-"
        lines.append(f"  {label:<20}{p / GIB:>15.2f}{m / GIB:>15.2f}{ratio:>15}")
    lines.append(f"  planner total {pred['total'] / GIB:.2f} GiB = tensor total + runtime reserve "
                 f"{pred['runtime'] / GIB:.2f} + fragmentation {pred['fragmentation'] / GIB:.2f} (not tensors: "
                 f"the dry run cannot see them)")
    logits = result["facts"].get("logits")
    if logits:
        lines.append(f"  lm_head output per micro-batch on this rank: {logits['shape']} {logits['dtype']}")
    lines.append(f"  master weights {result['facts']['param_dtypes']}, optimizer state "
                 f"{result['facts']['optimizer_state_dtypes']}")
    if result.get("live_at_peak"):
        lines.append("  created during the step and live at its peak (parameters and optimizer state not listed):")
        lines += [f"    {row['bytes'] / GIB:9.3f} GiB  x{row['storages']:<4d} {row['group']}"
                  for row in result["live_at_peak"]]
    return "\n".join(lines)


def error_of(result: dict) -> float:
    """|measured - predicted| / predicted, over tensor bytes (planner total minus runtime and fragmentation)."""
    p = result["predicted_bytes"]["tensor_total"]
    return abs(result["measured_peak_bytes"]["total"] - p) / p


def topology(world: int, nodes: int | None, devices_per_node: int | None, hardware: str) -> tuple[int, int]:
    """(nodes, devices per node) of `world` ranks: as given, else nodes of the profile's size."""
    from raytune_llama.planner.hardware import load_hardware

    if devices_per_node is None:
        if nodes is None:
            size = min(world, load_hardware(hardware).devices_per_node)
            devices_per_node = size if world % size == 0 else world
        else:
            devices_per_node = world // nodes
    nodes = world // devices_per_node if nodes is None else nodes
    if nodes * devices_per_node != world:
        raise ConfigError([f"--nodes ({nodes}) x --devices-per-node ({devices_per_node}) must equal the world size "
                           f"({world}); pass --world-size, --nodes and --devices-per-node that agree"])
    return nodes, devices_per_node


def dryrun_config(cfg, *, world: int | None, nodes: int | None, devices_per_node: int | None,
                  hardware: str | None, ranks: list[int] | None, explain: int = 0) -> dict:
    """Plan `cfg` on the given topology and dry-run the chosen ranks; the --json object."""
    from raytune_llama.trainer.planning import Topology, at_world_size, compute_dtype, make_run_plan

    p = cfg.parallel
    world = world or p.num_workers
    hw = hardware or (p.hardware if p.hardware != "auto" else ("cpu" if not p.use_gpu else None))
    if hw is None:
        raise ConfigError(["parallel.hardware: 'auto' needs a Ray cluster to tell the accelerator; pass --hardware "
                           "(mi250, mi250x, mi300x, h100, h200, a100-80gb)"])
    nodes, dpn = topology(world, nodes, devices_per_node, hw)
    hf_config, source = model_config(cfg.model.name_or_path)
    with tempfile.TemporaryDirectory(prefix="dryrun-model-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps(hf_config))
        run_plan = make_run_plan(at_world_size(cfg, world), folder, topology=Topology(hw, nodes, dpn))
    plan = run_plan.plan
    mp = "bf16" if compute_dtype(p.mixed_precision, p.use_gpu) == "bf16" else None
    stages = dry_run_stages(hf_config, plan, stage_ranks(plan, ranks), seq_len=cfg.data.seq_len, mixed_precision=mp,
                            master_weights=p.master_weights, hardware=hw, nodes=nodes, devices_per_node=dpn,
                            explain=explain)
    return {"plan": plan.to_dict(), "layout": plan.describe(), "plan_source": run_plan.source,
            "model_config_source": source, "topology": {"hardware": hw, "nodes": nodes, "devices_per_node": dpn},
            "seq_len": cfg.data.seq_len,
            "error_basis": "tensor bytes: planner total minus runtime reserve and fragmentation",
            "stages": stages, "max_abs_error": max(error_of(s) for s in stages)}


def dry_run_stages(hf_config: dict, plan, ranks: list[int], **kwargs) -> list[dict]:
    """dry_run_isolated for each of `ranks` (one fresh process each), with its wall time."""
    from raytune_llama.engine.dryrun import dry_run_isolated

    stages = []
    for rank in ranks:
        t0 = time.perf_counter()
        result = dry_run_isolated(hf_config, plan, rank=rank, world_size=plan.world_size, **kwargs)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        stages.append(result)
    return stages


def verify_plan(model: str, plan, cluster, workload) -> dict:
    """`plan --verify`: dry-run `plan` (one rank per pipeline stage) for the model (registry name,
    hub id, model folder or config.json) on `cluster` (a ClusterSpec) with `workload`'s sequence
    length and precision; the --json "verify" object."""
    path = Path(model).expanduser()
    if path.is_file():
        hf_config, source = json.loads(path.read_text()), str(path)
    else:
        hf_config, source = model_config(model)
    stages = dry_run_stages(hf_config, plan, stage_ranks(plan, None), seq_len=workload.seq_len,
                            mixed_precision="bf16" if workload.compute_dtype == "bf16" else None,
                            master_weights="bf16" if workload.optimizer == "adamw_bf16" else "fp32",
                            hardware=cluster.hardware.name, nodes=cluster.nodes,
                            devices_per_node=cluster.devices_per_node)
    return {"model_config_source": source, "error_basis": "tensor bytes: planner total minus runtime reserve and "
            "fragmentation", "stages": stages, "max_abs_error": max(error_of(s) for s in stages)}


def format_verification(report: dict) -> str:
    """The text `plan --verify` prints after the plan."""
    lines = [f"verified by a dry run (model config from {report['model_config_source']}):"]
    lines += [format_stage(stage) for stage in report["stages"]]
    lines.append(f"max |measured - predicted| / predicted over tensor bytes: {report['max_abs_error']:.1%}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Load the config, plan it, dry-run the ranks and print the comparison."""
    try:
        cfg = load_config(args.config, list(args.overrides))
        out = dryrun_config(cfg, world=args.world_size, nodes=args.nodes, devices_per_node=args.devices_per_node,
                            hardware=args.hardware, ranks=args.rank, explain=args.explain)
    except (ConfigError, ValueError) as exc:
        print(f"raytune-llama: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"layout {out['layout']} ({out['plan_source']}) on {out['topology']['nodes']} x "
          f"{out['topology']['devices_per_node']} {out['topology']['hardware']}, seq {out['seq_len']}; "
          f"model config from {out['model_config_source']}")
    for stage in out["stages"]:
        print(format_stage(stage))
    print(f"max |measured - predicted| / predicted over tensor bytes: {out['max_abs_error']:.1%} "
          f"(the planner's runtime reserve and fragmentation margin are left out on both sides)")
    return 0
