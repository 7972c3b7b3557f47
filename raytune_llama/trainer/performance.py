"""Driver-side performance context for a run: the model's FLOPs per token (for MFU) and the
planner's predicted step time and memory for the layout actually run, so measured and
predicted figures are reported side by side."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from raytune_llama.config import Config
from raytune_llama.planner.api import estimate
from raytune_llama.planner.errors import PlanError
from raytune_llama.planner.model_spec import from_hf_config

log = logging.getLogger(__name__)


def ddp_layout(cfg: Config) -> str:
    """The layout string of a replicated data-parallel run."""
    return f"dp_replicate={cfg.parallel.num_workers},micro_batch_size={cfg.train.micro_batch_size},grad_accum={cfg.grad_accum}"


def performance_context(cfg: Config, model_path: str) -> dict:
    """{'model_flops_per_token', 'layout', 'predicted_step_time_s', 'predicted_memory_bytes'}
    (predictions only where the planner has a profile for the workers' hardware)."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return {"layout": ddp_layout(cfg)}
    spec = from_hf_config(json.loads(config_file.read_text()), name=Path(model_path).name)
    context = {"model_flops_per_token": spec.model_flops_per_token(cfg.data.seq_len), "layout": ddp_layout(cfg)}
    if cfg.parallel.use_gpu:
        return context  # the accelerator kind is only known on the workers
    try:
        est = estimate(
            spec, cluster={"hardware": "cpu", "nodes": cfg.parallel.num_workers, "devices_per_node": 1},
            workload={"seq_len": cfg.data.seq_len, "global_batch": cfg.train.global_batch_size},
            layout=ddp_layout(cfg),
        )
    except PlanError as exc:
        log.warning("no planner prediction for this run: %s", exc)
        return context
    if est.feasible:
        context["predicted_step_time_s"] = est.time.step_time
        context["predicted_memory_bytes"] = int(est.memory.total)
    return context
