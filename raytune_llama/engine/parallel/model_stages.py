"""Pipeline-stage modules cut from a Hugging Face Llama-class causal LM.

The HF `LlamaForCausalLM.forward` cannot skip the embedding or run a subset of layers, so
the engine runs every layout (pipeline or not) through `CausalLMStage`: a thin module that
holds the *original* HF submodules (embedding on the first stage, norm + lm_head on the
last, a slice of decoder layers everywhere) under the *same* attribute names, so parameter
FQNs (`model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`) match the HF checkpoint
and checkpoints move between layouts unchanged. Works for Llama, Mistral and Qwen2 (same
module names). Attention runs through the HF attention with `attention_mask=None`, which
makes SDPA use its `is_causal` path: the same math the HF model uses for unpadded inputs.

Document packing (docs/data.md "Packing"): a batch may carry `position_ids` that restart at 0
at each document. Then the stage builds the attention mask with transformers' own
`create_causal_mask`, which finds the documents from the restarts and returns what the
model's attention implementation takes: a block-diagonal causal boolean mask for SDPA (shared
by all layers of the stage; [micro_batch, 1, seq, seq] bytes), an additive one for eager, a
BlockMask for flex attention, and nothing for flash-attention 2, which reads the restarts from
`position_ids` itself (varlen). Rows without a restart keep the `is_causal` path. Under
pipeline parallel every stage receives the position ids from the previous one
(`pass_positions`): stages exchange (hidden, position_ids).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class _Body(nn.Module):
    """Container mirroring `LlamaModel`'s attribute names (embed_tokens, layers, norm)."""

    def __init__(self, embed_tokens, layers: dict[str, nn.Module], norm, rotary_emb):
        super().__init__()
        self.embed_tokens = embed_tokens
        # ModuleDict keyed by the ORIGINAL layer index keeps FQNs stable across stage cuts.
        self.layers = nn.ModuleDict(layers)
        self.norm = norm
        self.rotary_emb = rotary_emb


class CausalLMStage(nn.Module):
    """One pipeline stage (or the whole model when pp == 1): ids/hidden -> hidden/logits."""

    def __init__(self, config, embed_tokens, layers: dict[str, nn.Module], norm, lm_head, rotary_emb):
        super().__init__()
        self.config = config
        self.model = _Body(embed_tokens, layers, norm, rotary_emb)
        self.lm_head = lm_head
        # Set by tensor_parallel.apply_tensor_parallel when sequence parallel is on: the
        # hidden state that enters a non-first stage is then a 1/sp_degree sequence shard.
        self.sp_degree = 1
        # Set by pipeline.build_schedule: stages exchange (hidden, position_ids).
        self.pass_positions = False

    @property
    def is_first(self) -> bool:
        """True if this stage embeds token ids."""
        return self.model.embed_tokens is not None

    @property
    def is_last(self) -> bool:
        """True if this stage produces logits."""
        return self.lm_head is not None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None):
        """Token ids (first stage) or hidden states (later stages) -> hidden states or logits;
        with `pass_positions` (pipeline stages), non-last stages return (hidden, position_ids)."""
        if self.is_first:
            seq_len = x.shape[1]
            h = self.model.embed_tokens(x)
        else:
            seq_len = x.shape[1] * self.sp_degree
            h = x
        mask = None
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=x.device).unsqueeze(0)
        else:
            mask = document_attention_mask(self.config, position_ids, h.dtype)
        # The rotary module only reads device and dtype from its first argument.
        probe = torch.empty(0, device=x.device, dtype=h.dtype)
        position_embeddings = self.model.rotary_emb(probe, position_ids)
        for layer in self.model.layers.values():
            h = layer(h, attention_mask=mask, position_ids=position_ids,
                      position_embeddings=position_embeddings)
        if self.model.norm is not None:
            h = self.model.norm(h)
        if self.lm_head is not None:
            return _to_local(self.lm_head(h))
        if self.pass_positions:
            return _to_local(h), position_ids
        return _to_local(h)


def document_attention_mask(config, position_ids: torch.Tensor, dtype: torch.dtype):
    """The attention mask of rows whose documents restart their position ids at 0, in the form
    the model's attention implementation takes (module doc); None when no row has a restart."""
    from transformers.masking_utils import create_causal_mask

    batch, seq_len = position_ids.shape
    shape_probe = torch.empty(batch, seq_len, 0, device=position_ids.device, dtype=dtype)
    return create_causal_mask(config, shape_probe, attention_mask=None, cache=None, position_ids=position_ids)


def _to_local(t: torch.Tensor) -> torch.Tensor:
    # Pipeline stages exchange plain tensors; a DTensor output (sequence-parallel norm
    # without a following TP module) is turned back into its local shard.
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def split_layers(num_layers: int, num_stages: int, layer_costs: Sequence[float] | None = None) -> list[range]:
    """Cut layers 0..L-1 into `num_stages` contiguous ranges with balanced total cost."""
    if num_stages < 1 or num_stages > num_layers:
        raise ValueError(
            f"pipeline stages (pp * virtual_stages = {num_stages}) must be between 1 and the "
            f"number of decoder layers ({num_layers})"
        )
    costs = list(layer_costs) if layer_costs is not None else [1.0] * num_layers
    if len(costs) != num_layers:
        raise ValueError(f"layer_costs has {len(costs)} entries but the model has {num_layers} layers")
    # Linear partition by dynamic programming: minimise the most expensive stage.
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for end in range(s, num_layers + 1):
            for start in range(s - 1, end):
                cost = max(best[s - 1][start], prefix[end] - prefix[start])
                if cost < best[s][end] - 1e-12:
                    best[s][end], cut[s][end] = cost, start
    bounds, end = [], num_layers
    for s in range(num_stages, 0, -1):
        start = cut[s][end]
        bounds.append(range(start, end))
        end = start
    return bounds[::-1]


def build_stage(model: nn.Module, stage_index: int, num_stages: int,
                layer_costs: Sequence[float] | None = None) -> CausalLMStage:
    """Build stage `stage_index` of `num_stages` from an HF *ForCausalLM, sharing its modules."""
    body = model.model
    if num_stages > 1 and getattr(model.config, "tie_word_embeddings", False):
        raise ValueError(
            "pipeline parallel with tie_word_embeddings=True is not supported: the embedding "
            f"(stage 0) and lm_head (stage {num_stages - 1}) would share one weight across ranks"
        )
    layer_range = split_layers(len(body.layers), num_stages, layer_costs)[stage_index]
    first, last = stage_index == 0, stage_index == num_stages - 1
    return CausalLMStage(
        model.config,
        embed_tokens=body.embed_tokens if first else None,
        layers={str(i): body.layers[i] for i in layer_range},
        norm=body.norm if last else None,
        lm_head=model.lm_head if last else None,
        rotary_emb=body.rotary_emb,
    )


def stage_ids_for_rank(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Stage indices held by one pipeline rank (looped placement: r, r+pp, r+2pp, ...)."""
    return [pp_rank + v * pp for v in range(virtual_stages)]
