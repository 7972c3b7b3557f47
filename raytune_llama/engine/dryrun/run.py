"""Dry run: one training step of the real layout, for one rank of an N-rank world, on this CPU,
under torch's fake process group and fake tensors (no weights read, no GPU), measuring the
rank's peak tensor memory by category next to the planner's prediction for the same stage.

    from raytune_llama.engine.dryrun import dry_run
    from raytune_llama.planner.plan import ParallelPlan
    r = dry_run("path/to/config.json", ParallelPlan(dp_shard=8, zero_stage=3), rank=0,
                world_size=8, seq_len=8192, mixed_precision="bf16", master_weights="fp32",
                hardware="h100")
    r["measured_peak_bytes"]["total"], r["predicted_bytes"]["tensor_total"]

    .venv/bin/python -m pytest tests/unit/test_dryrun.py -q      # the fast checks

The model is built exactly as `model_io.build_engine` builds it (meta model in the master
dtype, `ParallelEngine` -> `parallelize`: the production TP / recompute / FSDP2 / pipeline
code); the one difference is that each rank's local shards are allocated as fake tensors
instead of being read from safetensors (fake_world.fake_weight_materialisation). The optimizer
state a real run carries into every step is created first (AdamW over zero gradients), then one
`engine.train_step` runs under a memory tracker. How this checks the planner, and what it cannot
see: docs/planner.md, "How the planner is checked". DeepSpeed layouts are refused.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from raytune_llama.planner.plan import ParallelPlan

from . import fake_world
from .live_at_peak import LiveAtPeak

log = logging.getLogger(__name__)

# Tracker categories (torch.distributed._tools FSDPMemTracker / MemTracker names) -> the
# planner's MemoryBreakdown terms they correspond to. Activations include the logits, the loss
# buffers, pipeline send/recv buffers and backward temporaries (the trackers do not separate them).
CATEGORY_MAP = {
    "params": ("Sharded Param", "Unsharded Param", "Parameter", "Buffer"),
    "grads": ("Sharded Grad", "Unsharded Grad", "Gradient"),
    "optimizer": ("OptState", "Optstate"),
    "fsdp_buffers": ("All Gather", "Reduce Scatter"),
    "activations": ("Activation", "Temp", "Inputs", "Other"),
}


def load_hf_config(config: "str | Path | Mapping[str, Any] | Any"):
    """A transformers config from a dict, a config.json path, a model folder, or a config object."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, (str, Path)):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"config: {str(config)!r} is neither a config.json file nor a folder holding one; "
                                    f"pass the model folder or its config.json")
        config = json.loads(path.read_text())
    data = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    if "model_type" not in data:
        raise ValueError("config: no 'model_type' key; give an HF config.json (e.g. \"model_type\": \"llama\")")
    return AutoConfig.for_model(data.pop("model_type"), **data)


def pipeline_rank(plan: ParallelPlan, rank: int) -> int:
    """The pp coordinate of global `rank` (mesh axes dp_replicate, dp_shard, pp, tp; tp innermost)."""
    return (rank // plan.tp) % plan.pp


def _stage_shapes(engine, plan: ParallelPlan, seq_len: int, master, compute: str | None):
    # Static input/output metadata of every stage this rank holds (fake_world.set_static_pipeline_shapes).
    from raytune_llama.engine.parallel.tensor_parallel import vocab_parallel_mesh

    mp = torch.bfloat16 if compute == "bf16" else None
    # FSDP2 computes in its param dtype; autocast leaves the residual stream in the master dtype.
    hidden_dtype = mp if (mp is not None and plan.uses_fsdp) else master
    logits_dtype = mp or master
    b, inputs, outputs = plan.micro_batch_size, [], []
    for stage in engine.stages:
        h = stage.config.hidden_size
        hidden = torch.empty(b, seq_len // stage.sp_degree, h, dtype=hidden_dtype, requires_grad=True)
        inputs.append(torch.empty(b, seq_len, dtype=torch.long) if stage.is_first else hidden)
        if stage.is_last:
            vocab = stage.config.vocab_size
            if vocab_parallel_mesh(plan, engine.mesh, stage.config) is not None:
                vocab //= plan.tp
            outputs.append(torch.empty(b, seq_len, vocab, dtype=logits_dtype, requires_grad=True))
        else:
            outputs.append(hidden.detach().requires_grad_(True))
    return inputs, outputs


def create_optimizer_state(engine) -> None:
    # What every step after the first holds: AdamW's moments (created by a step over zero grads).
    for p in engine.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)


def _by_category(peak: dict) -> tuple[dict[str, int], dict[str, int]]:
    raw: dict[str, int] = {}
    for snap in peak.values():  # one entry per device (here only the fake cpu)
        for key, nbytes in snap.items():
            name = getattr(key, "value", key)
            raw[name] = raw.get(name, 0) + int(nbytes)
    measured = {term: sum(raw.get(k, 0) for k in keys) for term, keys in CATEGORY_MAP.items()}
    measured["total"] = raw.get("Total", sum(measured.values()))
    return measured, raw


def predicted_breakdown(hf_config, plan: ParallelPlan, *, stage: int, seq_len: int, compute_dtype: str,
                        optimizer: str, hardware: str, nodes: int = 1,
                        devices_per_node: int | None = None) -> dict[str, float]:
    """The planner's MemoryBreakdown terms for pipeline stage `stage`, plus `total` and
    `tensor_total` (total minus the runtime reserve and fragmentation margin, which no tensor
    tracker can see)."""
    from raytune_llama.planner import memory_model
    from raytune_llama.planner.cluster import make_cluster
    from raytune_llama.planner.model_spec import from_hf_config
    from raytune_llama.planner.workload import make_workload

    spec = from_hf_config(hf_config.to_dict(), name=getattr(hf_config, "_name_or_path", None) or "model")
    cluster = make_cluster(hardware, nodes, devices_per_node)
    workload = make_workload(plan.global_batch(), seq_len, optimizer, compute_dtype=compute_dtype)
    mb = memory_model.stage_memory(spec, cluster, workload, plan, stage)
    terms = mb.terms()
    terms["total"] = mb.total
    terms["tensor_total"] = mb.total - mb.runtime - mb.fragmentation
    terms["state_family"] = mb.state_family
    terms["phase"] = mb.phase
    return terms


def dry_run(config, plan: ParallelPlan, *, rank: int = 0, world_size: int | None = None, seq_len: int,
            mixed_precision: str | None = "bf16", master_weights: str = "fp32", hardware: str = "h100",
            nodes: int = 1, devices_per_node: int | None = None, explain: int = 0) -> dict[str, Any]:
    """One engine.train_step of `plan` as global `rank` under a fake process group; returns the
    measured peak bytes by category, the planner's prediction for the rank's stage, and timings.
    `explain` > 0 adds "live_at_peak": the largest groups of tensors (by op, module, phase) that
    the step created and that are live at its peak (live_at_peak.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from raytune_llama.engine.model_io import master_dtype
    from raytune_llama.engine.parallel import ParallelEngine
    from raytune_llama.engine.parallel.sharded_load import meta_model

    world_size = plan.world_size if world_size is None else world_size
    if plan.world_size != world_size:
        raise ValueError(f"world_size ({world_size}) must equal the plan's dp_replicate*dp_shard*tp*pp "
                         f"({plan.world_size}); pass the world the plan was made for")
    if plan.backend != "torch":
        raise ValueError(
            f"backend: {plan.backend!r} cannot be dry-run: the dry run drives torch's FSDP2 / DTensor / pipelining "
            f"code and torch's memory trackers under fake tensors; DeepSpeed's engine (its own communication layer "
            f"and ZeRO partition buffers) is not supported under the fake process group; check a DeepSpeed layout "
            f"with `raytune-llama estimate`, or dry-run a torch layout (parallel.layout with backend=torch)")
    if seq_len % max(1, plan.tp if plan.sequence_parallel else 1):
        raise ValueError(f"seq_len ({seq_len}) must be a multiple of tp ({plan.tp}) under sequence parallel")
    hf_config = load_hf_config(config)
    master = master_dtype(master_weights)
    # As model_io.build_engine: pure bf16 weights compute in bf16 with no autocast / MP policy.
    compute = None if master_weights == "bf16" else mixed_precision
    compute_dtype = "bf16" if (compute == "bf16" or master_weights == "bf16") else "fp32"
    stage = pipeline_rank(plan, rank)
    predicted = predicted_breakdown(
        hf_config, plan, stage=stage, seq_len=seq_len, compute_dtype=compute_dtype,
        optimizer="adamw_bf16" if master_weights == "bf16" else "adamw", hardware=hardware, nodes=nodes,
        devices_per_node=devices_per_node)

    t0 = time.perf_counter()
    model = meta_model(hf_config, dtype=master)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)  # the meta parameters enter it in to_empty
    logits_seen: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dryrun-") as no_weights, \
            fake_world.fake_process_group(rank, world_size):
        # The engine and its mesh are built outside FakeTensorMode (init_device_mesh and the 2-D
        # TP x FSDP wrapping fail inside it); only the local shards are allocated inside it.
        with fake_world.fake_weight_materialisation(fake_mode):
            engine = ParallelEngine(model, plan, device=fake_world.FAKE_DEVICE, lr=1e-5, weight_decay=0.0,
                                    max_grad_norm=1.0, mixed_precision=compute, load_from=no_weights)
        try:
            for st in engine.stages:
                if st.is_last:
                    st.lm_head.register_forward_hook(lambda m, i, out: logits_seen.append(
                        {"shape": list(getattr(out, "_local_tensor", out).shape), "dtype": str(out.dtype)}))
            build_s = time.perf_counter() - t0
            with fake_mode, fake_world.FakeScalars(), fake_world.fresh_sharding_propagation():
                for module in engine.modules:
                    fake_world.fake_ddp_allreduce(module)
                if engine.schedule is not None:
                    fake_world.set_static_pipeline_shapes(engine._pipe_stages,
                                                          *_stage_shapes(engine, plan, seq_len, master, compute))
                rows = plan.micro_batch_size * plan.grad_accum
                batch = {"input_ids": torch.zeros(rows, seq_len, dtype=torch.long),
                         "labels": torch.zeros(rows, seq_len, dtype=torch.long)}
                create_optimizer_state(engine)
                tracker = fake_world.memory_tracker(engine.modules, engine.optimizer)
                t1 = time.perf_counter()
                recorder = LiveAtPeak(tracker._mod_tracker, fake_mode) if explain > 0 else contextlib.nullcontext()
                with recorder, tracker:
                    engine.train_step(batch)
                step_s = time.perf_counter() - t1
            measured, raw = _by_category(tracker.get_tracker_snapshot("peak"))
            master_params = [p for p in engine.parameters()]
            states = [v for s in engine.optimizer.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor) and v.dim() > 0]
            facts = {
                "param_dtypes": sorted({str(p.dtype) for p in master_params}),
                "optimizer_state_dtypes": sorted({str(v.dtype) for v in states}),
                "local_param_bytes": sum(_local(p).numel() * p.element_size() for p in master_params),
                "local_optimizer_bytes": sum(_local(v).numel() * v.element_size() for v in states),
                "full_param_count": sum(p.numel() for p in master_params),
                "logits": logits_seen[-1] if logits_seen else None,
            }
            live = recorder.top(explain) if explain > 0 else None
        finally:
            engine.close()
    log.info("dry run rank %d/%d (stage %d): measured %.2f GiB, planner tensor bytes %.2f GiB, step %.1f s",
             rank, world_size, stage, measured["total"] / 2**30, predicted["tensor_total"] / 2**30, step_s)
    return {"rank": rank, "world_size": world_size, "pp_stage": stage, "plan": plan.to_dict(),
            "layout": plan.describe(), "seq_len": seq_len, "hardware": hardware,
            "measured_peak_bytes": measured, "tracker_peak_bytes": raw, "predicted_bytes": predicted,
            "facts": facts, **({"live_at_peak": live} if live is not None else {}), "build_s": round(build_s, 2), "step_s": round(step_s, 2)}


def dry_run_isolated(config, plan: ParallelPlan, **kwargs) -> dict[str, Any]:
    """`dry_run` in a fresh Python process (spawned): torch keeps per-process state keyed by
    mesh shape (DTensor redistribution plans holding process-group names), so two dry runs of
    different ranks, or a dry run and a later real process group, must not share a process."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(dry_run, (config, plan), kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t
