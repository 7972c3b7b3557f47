"""Activation recomputation (a.k.a. activation checkpointing) per decoder layer.

* none      - keep every activation.
* full      - keep only each layer's input; rerun the whole layer in backward
              (checkpoint_wrapper, non-reentrant so it composes with FSDP2 and DTensor).
* selective - per-op policy inside each layer: SAVE the outputs of the expensive ops
              (matmuls, the fused SDPA attention kernel, TP collectives, so no
              communication is repeated) and RECOMPUTE the cheap memory-bound ones (RMSNorm,
              rotary, SiLU, elementwise products, residual adds, casts). This is the
              "recompute cheap ops" flavour: it drops most of a layer's element-wise
              activations for a few % extra time. (Megatron's "selective" instead recomputes
              the attention core; with fused SDPA that core no longer stores the s*s scores,
              so saving its output and recomputing the pointwise ops is the better trade.)
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .model_stages import CausalLMStage

log = logging.getLogger(__name__)


def _save_list() -> set:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    c10d = getattr(torch.ops, "_c10d_functional", None)
    if c10d is not None:
        for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor"):
            if hasattr(c10d, name):
                ops.add(getattr(c10d, name).default)
    return ops


def _selective_policy(save_ops, ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in save_ops else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context_fn():
    return create_selective_checkpoint_contexts(functools.partial(_selective_policy, _save_list()))


def wrap_layer(layer: nn.Module, mode: str) -> nn.Module:
    """Return `layer` wrapped for recompute mode 'full' or 'selective' ('none': unchanged)."""
    if mode == "none":
        return layer
    # Llama-class blocks have no dropout (attention_dropout is 0 in training configs), so the
    # RNG state need not be saved and replayed for the recomputation.
    if mode == "full":
        return checkpoint_wrapper(layer, preserve_rng_state=False)
    if mode == "selective":
        return checkpoint_wrapper(layer, preserve_rng_state=False, context_fn=_selective_context_fn)
    raise ValueError(f"recompute must be one of none|selective|full, got {mode!r}")


def apply_recompute(stage: CausalLMStage, mode: str) -> None:
    """Wrap every decoder layer of `stage` for the given recompute mode, in place."""
    if mode == "none":
        return
    for name in list(stage.model.layers.keys()):
        stage.model.layers[name] = wrap_layer(stage.model.layers[name], mode)
    log.info("activation recompute: %s on %d layers", mode, len(stage.model.layers))
