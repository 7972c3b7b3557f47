"""Parallel engine: apply a ParallelPlan (DDP / FSDP2 / TP+SP / pipeline / DeepSpeed ZeRO) to a
Llama-class HF model and train it. Imports torch (and DeepSpeed lazily), never Ray.
See docs/parallel_engine.md."""
from .engine import ParallelEngine
from .mesh import MESH_AXES, build_mesh, data_parallel_rank_and_size, init_distributed
from .model_stages import CausalLMStage, build_stage, split_layers
from .parallelize import ParallelModel, parallelize
from .tensor_parallel import decoder_layer_tp_plan, validate_tensor_parallel

__all__ = [
    "MESH_AXES", "CausalLMStage", "ParallelEngine", "ParallelModel", "build_mesh", "build_stage",
    "data_parallel_rank_and_size", "decoder_layer_tp_plan", "init_distributed", "parallelize",
    "split_layers", "validate_tensor_parallel",
]
