"""Token-level causal-LM loss that sums over non-ignored tokens, so that any split of a
global batch (data-parallel ranks, micro-batches, pipeline chunks) adds up to exactly the
single-process mean: loss_part = sum(token CE) / global_token_count."""
from __future__ import annotations

import torch
import torch.nn.functional as F


from raytune_llama.engine.packing import IGNORE_INDEX


def count_target_tokens(labels: torch.Tensor) -> int:
    """Number of tokens that contribute to the loss (after the causal shift)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum().item())


def summed_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over tokens whose label is not ignored."""
    shift_logits = logits[..., :-1, :].contiguous().float()
    shift_labels = labels[..., 1:].contiguous().to(shift_logits.device)
    return F.cross_entropy(
        shift_logits.view(-1, shift_logits.size(-1)),
        shift_labels.view(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
