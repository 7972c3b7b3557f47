"""Parallel engine: apply a ParallelPlan (DDP / FSDP2 / TP+SP / pipeline / DeepSpeed ZeRO) to a
Llama-class HF model and train it. Imports torch (and DeepSpeed lazily), never Ray.
See docs/parallel_engine.md."""
from raytune_llama.versions import check_torch_version

# First, before any torch import: an older torch would otherwise fail below with an ImportError
# that names neither its version nor the minimum (raytune_llama/versions.py, cluster/README.md).
check_torch_version()

from .engine import ParallelEngine  # noqa: E402
from .mesh import MESH_AXES, build_mesh, data_parallel_rank_and_size, init_distributed  # noqa: E402
from .model_stages import CausalLMStage, build_stage, split_layers  # noqa: E402
from .parallelize import ParallelModel, parallelize  # noqa: E402
from .plan_check import check_plan  # noqa: E402
from .tensor_parallel import decoder_layer_tp_plan  # noqa: E402

__all__ = [
    "MESH_AXES", "CausalLMStage", "ParallelEngine", "ParallelModel", "build_mesh", "build_stage", "check_plan",
    "data_parallel_rank_and_size", "decoder_layer_tp_plan", "init_distributed", "parallelize",
    "split_layers",
]
