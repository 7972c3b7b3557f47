"""Tensor (+ sequence) parallel for Llama-class decoder layers with DTensor.

Megatron layout: q/k/v and gate/up are column-parallel (each rank owns whole heads / a slice
of the FFN), o and down are row-parallel (their partial sums are all-reduced, or
reduce-scattered along the sequence with sequence parallel). With sequence parallel the
residual stream between blocks stays sharded along the sequence (dim 1) and the RMSNorms run
on their shard; attention and MLP inputs are all-gathered to the full sequence first.

Loss parallel: the embedding is vocab-parallel and the lm_head is column-parallel with its
output left sharded over the vocabulary (`Shard(-1)`), so no rank ever holds full-vocabulary
logits. The cross-entropy runs on the vocab-sharded DTensor under
`torch.distributed.tensor.parallel.loss_parallel()` (engine/loss.py): max, sum-exp and target
logit are all-reduced over tp instead of gathering the logits. Stages return plain local
tensors (model_stages._to_local), so the loss rebuilds the DTensor from this rank's vocab
columns with `vocab_parallel_mesh`. Where tp does not divide the vocabulary the embedding and
lm_head stay replicated and the loss is the plain one.

LoRA (docs/lora.md): a peft-wrapped projection keeps its style on `base_layer`; its adapters
follow the base. Column-parallel base: lora_B column-parallel too (each rank its rows of the
output), lora_A replicated (its input is the replicated one; its gradient is the same on every
rank because ColwiseParallel all-reduces lora_B's input gradient). Row-parallel base: lora_A
row-parallel with the base's output layout (its r-wide partial sums reduced like the base's
output: all-reduce, or reduce-scatter along the sequence under sequence parallel), lora_B
replicated; under sequence parallel lora_B sees a sequence shard, so it is a replicated DTensor
(SequenceParallel) whose weight gradient is reduced over tp like the norms'.
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from raytune_llama.planner.plan import ParallelPlan

from .model_stages import CausalLMStage

log = logging.getLogger(__name__)


def vocab_parallel(config, tp: int) -> bool:
    """True when tp > 1 divides the vocabulary: embedding and lm_head are then vocab-sharded."""
    return tp > 1 and config.vocab_size % tp == 0


def vocab_parallel_mesh(plan: ParallelPlan, mesh: DeviceMesh, config) -> DeviceMesh | None:
    """The tp mesh the last stage's logits are vocab-sharded over, or None (full logits)."""
    return mesh["tp"] if plan.backend == "torch" and vocab_parallel(config, plan.tp) else None


def decoder_layer_tp_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """TP layout of one decoder layer: submodule name -> parallel style."""
    if not sequence_parallel:
        return {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
    return {
        "input_layernorm": SequenceParallel(),
        # HF passes hidden_states to self_attn as a keyword argument: gather it to the full sequence.
        "self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
            use_local_output=True,
        ),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
    }


class VocabParallelEmbedding(RowwiseParallel):
    """RowwiseParallel for the embedding (vocabulary rows sharded over tp, output reduced to
    `output_layouts`) whose lookup runs on this rank's rows only, as Megatron's vocab-parallel
    embedding does: ids outside the rows look up row 0 and are zeroed, and the partial sums are
    reduced by the output redistribution. DTensor's own embedding backward has no vocab-sharded
    strategy: it builds the full vocab x hidden gradient (plus its fp32 copy for the gradient
    reduction) on every tp rank, 5.9 GB for Llama 3 70B, before reduce-scattering it; here the
    backward is the local rows' (docs/parallel_engine.md, "Tensor parallel (DTensor)")."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding applies to nn.Embedding, got {type(module).__name__}")
        module = super()._apply(module, device_mesh)
        module.forward = types.MethodType(_local_rows_lookup, module)
        return module


def _local_rows_lookup(self: nn.Embedding, ids: torch.Tensor) -> DTensor:
    weight = self.weight  # a DTensor sharding the rows over tp (FSDP2 has gathered any dp shard)
    local = weight.to_local()
    ids_local = ids.to_local() if isinstance(ids, DTensor) else ids
    rows = local.shape[0]
    first = weight.device_mesh.get_local_rank() * rows
    shifted = ids_local - first
    outside = (shifted < 0) | (shifted >= rows)
    pad = None
    if self.padding_idx is not None and 0 <= self.padding_idx - first < rows:
        pad = self.padding_idx - first
    out = F.embedding(shifted.masked_fill(outside, 0), local, pad)
    out = out.masked_fill(outside.unsqueeze(-1), 0.0)
    return DTensor.from_local(out, weight.device_mesh, [Partial()], run_check=False)


def with_adapters(layer_plan: dict[str, ParallelStyle], layer: nn.Module,
                  sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """`layer_plan` for a decoder layer whose projections may be peft LoRA layers: the base
    style moves to `<name>.base_layer` and the adapters get theirs (module doc)."""
    from .lora import ADAPTER, is_lora_layer

    plan: dict[str, ParallelStyle] = {}
    for name, style in layer_plan.items():
        if not is_lora_layer(layer.get_submodule(name)):
            plan[name] = style
            continue
        plan[f"{name}.base_layer"] = style
        if isinstance(style, ColwiseParallel):
            plan[f"{name}.lora_B.{ADAPTER}"] = ColwiseParallel()
        elif isinstance(style, RowwiseParallel):
            plan[f"{name}.lora_A.{ADAPTER}"] = RowwiseParallel(output_layouts=style.output_layouts[0])
            if sequence_parallel:
                plan[f"{name}.lora_B.{ADAPTER}"] = SequenceParallel(use_local_output=True)
        else:
            raise TypeError(f"no LoRA tensor-parallel layout for {name} with {type(style).__name__}")
    return plan


def outer_tp_plan(stage: CausalLMStage, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """TP layout of the embedding / final norm / lm_head held by this stage."""
    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {}
    if stage.is_first:
        # Vocab-parallel embedding; its output leaves sequence-sharded under SP.
        plan["model.embed_tokens"] = VocabParallelEmbedding(input_layouts=Replicate(), output_layouts=seq)
    if stage.is_last:
        if sequence_parallel:
            plan["model.norm"] = SequenceParallel()
        # Logits stay vocab-sharded (a DTensor, Shard(-1)): the loss runs under loss_parallel().
        plan["lm_head"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
    return plan


def apply_tensor_parallel(stage: CausalLMStage, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard one stage's layers (and embedding/lm_head) over the tp mesh axis, in place."""
    tp = tp_mesh.size()
    vocab_ok = vocab_parallel(stage.config, tp)
    outer = outer_tp_plan(stage, sequence_parallel)
    if not vocab_ok:
        # An uneven vocab split would need padding; keep embedding/lm_head replicated instead,
        # which sequence parallel cannot do (refused by plan_check).
        assert not sequence_parallel, "sequence parallel needs tp to divide the vocabulary"
        outer = {k: v for k, v in outer.items() if k == "model.norm"}
    tied = (getattr(stage.config, "tie_word_embeddings", False) and stage.is_first and stage.is_last
            and stage.lm_head.weight is stage.model.embed_tokens.weight)
    if outer:
        parallelize_module(stage, tp_mesh, outer)
    if tied and vocab_ok:
        # Each style made its own DTensor of the shared weight; both shard the vocabulary (dim
        # 0) over tp, so one parameter serves both again and the tie keeps training as one.
        stage.lm_head.weight = stage.model.embed_tokens.weight
    layer_plan = decoder_layer_tp_plan(sequence_parallel)
    for layer in stage.model.layers.values():
        parallelize_module(layer, tp_mesh, with_adapters(layer_plan, layer, sequence_parallel))
    if sequence_parallel:
        stage.sp_degree = tp
    log.info("tensor parallel: tp=%d sequence_parallel=%s over %d layers (%s)",
             tp, sequence_parallel, len(stage.model.layers), ", ".join(sorted(outer)) or "no embedding/head")
