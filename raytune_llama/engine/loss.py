"""Token-level causal-LM loss that sums over non-ignored tokens, so that any split of a
global batch (data-parallel ranks, micro-batches, pipeline chunks) adds up to exactly the
single-process mean: loss_part = sum(token CE) / global_token_count.

Under tensor parallel the logits arrive vocab-sharded (each tp rank holds vocab/tp columns,
see docs/parallel_engine.md, "Loss parallel"): `summed_causal_lm_loss(..., vocab_mesh=tp_mesh)`
wraps them as a `Shard(-1)` DTensor and the cross-entropy runs under
`torch.distributed.tensor.parallel.loss_parallel()` (`loss_parallel_context`), whose forward
AND backward must both run inside that context. The result is the same sum on every tp rank.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


from raytune_llama.engine.packing import IGNORE_INDEX


def count_target_tokens(labels: torch.Tensor) -> int:
    """Number of tokens that contribute to the loss (after the causal shift)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum().item())


def loss_parallel_context(vocab_mesh) -> contextlib.AbstractContextManager:
    """loss_parallel() when the logits are vocab-sharded over `vocab_mesh`, else a no-op context."""
    if vocab_mesh is None:
        return contextlib.nullcontext()
    return _loss_parallel()


@contextlib.contextmanager
def _loss_parallel():
    from torch.distributed.tensor.parallel import loss_parallel

    ctx = loss_parallel()
    ctx.__enter__()
    try:
        yield
    finally:
        # torch's context leaves its DTensor loss handlers installed when the body raises.
        ctx.__exit__(None, None, None)


def summed_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_mesh=None) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over tokens whose label is not ignored.

    With `vocab_mesh` (a 1-D tp DeviceMesh), `logits` is this rank's vocab shard (a plain
    tensor or a Shard(-1) DTensor); call it, and the backward, inside `loss_parallel_context`.
    Returns a plain scalar tensor (the full-vocabulary sum, identical on every tp rank)."""
    if vocab_mesh is not None:
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(logits, DTensor):
            logits = DTensor.from_local(logits, vocab_mesh, [Shard(logits.dim() - 1)], run_check=False)
    # The labels move one position left (the last position gets no target) instead of the logits
    # dropping their last position: slicing the logits would copy them (a second bf16 logits
    # tensor in forward) and its backward would allocate a zero-filled one in backward.
    next_labels = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)
    ce = F.cross_entropy(
        logits.float().view(-1, logits.size(-1)),
        next_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    if vocab_mesh is not None:
        # Replicate over tp: the local value is already the full sum; its backward stays a DTensor.
        ce = ce.to_local()
    return ce
