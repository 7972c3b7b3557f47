"""Replicated data-parallel training step (DDP) with a token-exact global loss.

Each data-parallel rank gets its slice of the global batch; gradients are scaled so that the
all-reduced gradient equals the gradient of the single-process mean loss over every
non-ignored token of the global batch, whatever the split into ranks and micro-batches."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from raytune_llama.engine.loss import count_target_tokens, summed_causal_lm_loss


class DDPEngine:
    """Wraps a model in DDP, owns AdamW, and runs one optimizer step per train_step()."""

    def __init__(self, model, *, device, lr, weight_decay, betas, max_grad_norm,
                 micro_batch_size, autocast_dtype=None):
        self.device = torch.device(device)
        model.to(self.device)
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.dp_size = dist.get_world_size() if self.distributed else 1
        self.dp_rank = dist.get_rank() if self.distributed else 0
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids) if self.distributed else model
        self.module = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=tuple(betas))
        self.max_grad_norm = max_grad_norm
        self.micro_batch_size = micro_batch_size
        self.autocast_dtype = autocast_dtype

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _global_token_count(self, labels: torch.Tensor) -> int:
        count = torch.tensor([count_target_tokens(labels)], dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(count)
        return int(count.item())

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Forward/backward over this rank's micro-batches, clip, step; returns the global
        mean loss, the gradient norm and the number of loss tokens of the global batch."""
        input_ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        total_tokens = self._global_token_count(labels)
        # DDP averages gradients over ranks; scale back so the result is a global token mean.
        scale = self.dp_size / max(total_tokens, 1)
        chunks = list(zip(input_ids.split(self.micro_batch_size), labels.split(self.micro_batch_size)))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (ids, lab) in enumerate(chunks):
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if (last or not self.distributed) else self.model.no_sync()
            with sync, self._autocast():
                logits = self.model(input_ids=ids, use_cache=False).logits
                part = summed_causal_lm_loss(logits, lab)
            (part * scale).backward()
            loss_sum += part.detach().double()
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.distributed:
            dist.all_reduce(loss_sum)
        return {"loss": float(loss_sum.item()) / max(total_tokens, 1), "grad_norm": grad_norm, "tokens": total_tokens}

    def _clip(self) -> float:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.max_grad_norm and self.max_grad_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params]))

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def model_state_dict(self) -> dict:
        """Full model state (every rank holds it under DDP)."""
        return self.module.state_dict()

    def optimizer_state_dict(self) -> dict:
        """Optimizer state."""
        return self.optimizer.state_dict()

    def load_state(self, model_state: dict, optimizer_state: dict | None) -> None:
        """Restore model (and optimizer) state saved by a previous run."""
        self.module.load_state_dict(model_state)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
