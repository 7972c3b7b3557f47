"""raytune_llama: Ray-based elastic fine-tuning of Llama-class models with automatic
parallelization. Importing the package is cheap; torch and Ray load on first use.

    import raytune_llama
    result = raytune_llama.plan(model="llama3-70b", cluster={"hardware": "mi250", "nodes": 8,
                                "devices_per_node": 8}, workload={"seq_len": 1024, "global_batch": 512})
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "plan": "raytune_llama.planner.api",
    "estimate": "raytune_llama.planner.api",
    "PlanResult": "raytune_llama.planner.api",
    "ParallelPlan": "raytune_llama.planner.plan",
    "PlanError": "raytune_llama.planner.errors",
    "Config": "raytune_llama.config",
    "ConfigError": "raytune_llama.config",
    "load_config": "raytune_llama.config",
    "LlamaTrainer": "raytune_llama.trainer.llama_trainer",
    "enable_advanced_parallelization": "raytune_llama.engine.one_line",
    "disable_advanced_parallelization": "raytune_llama.engine.one_line",
    "get_dataset_shard": "raytune_llama.trainer.user_loop",
    "log_step": "raytune_llama.trainer.user_loop",
    "save_checkpoint": "raytune_llama.trainer.user_checkpoints",
    "resume": "raytune_llama.trainer.user_checkpoints",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Load exported names lazily so `import raytune_llama` pulls in neither torch nor Ray."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'raytune_llama' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
