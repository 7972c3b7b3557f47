"""ParallelEngine: one object that a training loop (the Ray worker, torchrun, a test) drives.

    engine = ParallelEngine(model, plan, lr=3e-4, weight_decay=0.1, max_grad_norm=1.0)
    dp_rank, dp_size = engine.dp_rank, engine.dp_size         # slice the global batch by these
    stats = engine.train_step({"input_ids": ids, "labels": labels})  # this dp rank's rows
    engine.set_lr(new_lr)
    model_sd, optim_sd = engine.get_state(full=False)         # DCP-ready shards (HF FQNs)

Sharded loading: pass a meta-device model (sharded_load.meta_model(config)) and
`load_from=<safetensors file or folder>`; each rank reads only what it keeps (every layout and
backend; model_io.build_engine does this for every run). The model's parameter dtype is the
master dtype (fp32 unless parallel.master_weights is bf16); `mixed_precision="bf16"` computes
in bf16 over it (FSDP2's MixedPrecisionPolicy, autocast elsewhere, DeepSpeed's bf16 mode).

Loss normalisation (see engine/loss.py): every micro-batch contributes
sum(token CE) / T_global, where T_global is the number of non-ignored target tokens of the
whole GLOBAL batch (all-reduced over the dp axis once per step). Gradient reductions
average over dp ranks (DDP/FSDP/DeepSpeed all do), so the backward loss is scaled by dp_size
to turn that mean back into the sum. The result equals one process on the global batch.
"""
from __future__ import annotations

import contextlib

import logging
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from raytune_llama.engine.loss import count_target_tokens, summed_causal_lm_loss
from raytune_llama.planner.plan import ParallelPlan

from . import deepspeed_backend as ds
from .lora import lora_settings
from .mesh import build_mesh, data_parallel_rank_and_size, default_device_type, dp_mesh, init_distributed
from .optim import build_adamw, clip_grad_norm
from .parallelize import parallelize
from .pipeline import build_schedule
from .plan_check import check_plan
from .recompute import apply_recompute

log = logging.getLogger(__name__)


def check_loss_fn(plan: ParallelPlan, loss_fn) -> None:
    """A custom loss_fn runs on torch layouts only (raises before anything is built)."""
    if loss_fn is not None and plan.backend == "deepspeed":
        raise ValueError("loss_fn on a DeepSpeed layout: DeepSpeed runs its own backward per micro-batch and "
                         "cannot rescale by a target count known only afterwards; use a torch layout "
                         "(parallel.layout ... backend=torch)")


class ParallelEngine:
    """Applies a ParallelPlan to an HF causal LM and runs optimizer steps on global batches."""

    def __init__(self, model: nn.Module, plan: ParallelPlan, *, mesh=None, device: str | None = None,
                 lr: float = 3e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, max_grad_norm: float | None = 1.0, mixed_precision: str | None = None,
                 layer_costs: Sequence[float] | None = None, load_from: str | None = None, lora=None):
        # lora: LoraSettings (or a train.lora mapping): peft adapters on a frozen base (docs/lora.md)
        self.lora = lora_settings(lora)
        check_plan(plan, getattr(model, "config", None), self.lora)  # before anything is built
        if mixed_precision not in (None, "bf16"):
            raise ValueError(f"mixed_precision: {mixed_precision!r} is not supported; use 'bf16' (MI250, H100 and "
                             f"later support it) or None for fp32 (fp16 would need loss scaling)")
        device_type = device or default_device_type()
        init_distributed(device_type)
        self.plan = plan
        self.mesh = mesh if mesh is not None else build_mesh(plan, device_type)
        self.device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" \
            else torch.device(device_type)
        self.max_grad_norm = max_grad_norm
        self.mixed_precision = mixed_precision
        self.dp_rank, self.dp_size = data_parallel_rank_and_size(self.mesh)
        self._dp_group = dp_mesh(self.mesh).get_group()
        self._pp_group = self.mesh.get_group("pp") if plan.pp > 1 else None
        self.schedule = None
        self.ds_engine = None
        adam = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        if load_from is None and any(p.is_meta for p in model.parameters()):
            raise ValueError("a meta-device model needs load_from=<safetensors file or folder> to read its weights")
        if plan.backend == "deepspeed":
            stage = ds.build_stage_for_deepspeed(model, plan, load_from, self.device, max_grad_norm, mixed_precision)
            apply_recompute(stage, plan.recompute)
            optimizer = build_adamw(stage.named_parameters(), **adam)
            self.ds_engine = ds.build_deepspeed_engine(stage, optimizer, plan, max_grad_norm, mixed_precision)
            self.stages, self.modules, self.stage_ids = [stage], [self.ds_engine], [0]
            self.optimizer = self.ds_engine.optimizer
        elif plan.backend == "torch":
            # A meta-device model is filled with this rank's tensors inside parallelize, before
            # the optimizer exists (so it sees the materialised parameters).
            pm = parallelize(model, plan, self.mesh, layer_costs=layer_costs,
                             mixed_precision=mixed_precision, load_from=load_from, lora=self.lora)
            self.stages, self.modules, self.stage_ids = pm.stages, pm.modules, pm.stage_ids
            self.optimizer = build_adamw(self._named_params(), **adam)
            if plan.pp > 1:
                self.schedule, self._pipe_stages = build_schedule(
                    self.modules, self.stage_ids, plan, self.mesh, self.device, self._pipeline_loss)
        else:
            raise ValueError(f"backend must be 'torch' or 'deepspeed', got {plan.backend!r}")
        # Autocast only where FSDP2's MixedPrecisionPolicy is not doing the casting.
        self._autocast = mixed_precision is not None and plan.autocasts
        self._loss_scale = 1.0
        self._pp_ce: list[torch.Tensor] = []
        self.loss_fn = None
        self._counts: list[float] = []  # per micro-batch target counts of a custom loss_fn
        log.info("engine: %s on %s, dp rank %d/%d", plan.describe(), self.device, self.dp_rank, self.dp_size)

    # -- public API -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The module this rank runs (the wrapped stage; first stage when it holds several)."""
        return self.modules[0]

    def _named_params(self):
        # Trainable parameters only: with LoRA the frozen base is neither optimised nor clipped.
        seen = set()
        for stage in self.stages:
            for name, p in stage.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters held by this rank (all its stages), each once (LoRA: the adapters)."""
        return [p for _, p in self._named_params()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(HF name, parameter) of every trainable parameter this rank holds (shards), each once
        (LoRA: the adapters, under peft's names)."""
        return list(self._named_params())

    def set_loss_fn(self, loss_fn) -> None:
        """A custom loss in place of next-token cross-entropy: loss_fn(logits, labels) returns
        (summed loss, number of targets) for one micro-batch (logits [b, s, vocab]; labels [b, s]
        unshifted, as HF's models take them). The step's loss is the global sum over the global
        count, exactly what one process computes over the whole batch. Under tensor parallel the
        logits are a vocab-sharded DTensor and loss_fn runs inside loss_parallel()
        (torch's cross_entropy works there). DeepSpeed layouts refuse it."""
        check_loss_fn(self.plan, loss_fn)
        self.loss_fn = loss_fn

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float | int]:
        """One optimizer step on this dp rank's rows of the global batch; returns global stats."""
        if self.ds_engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        stats = self.forward_backward(batch)
        stats["grad_norm"] = self.optimizer_step()
        return stats

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> dict[str, float | int]:
        """Forward and backward over this dp rank's micro-batches, gradients reduced per the
        layout and accumulated into .grad; no optimizer step. Returns the global mean loss
        over every non-ignored token of the global batch and that token count."""
        input_ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        positions = _positions(batch, self.device)
        rows = self.plan.micro_batch_size * self.plan.grad_accum
        if input_ids.shape[0] != rows:
            raise ValueError(f"batch has {input_ids.shape[0]} rows; this dp rank needs micro_batch_size * "
                             f"grad_accum = {self.plan.micro_batch_size} * {self.plan.grad_accum} = {rows}")
        if self.loss_fn is not None:
            return self._custom_loss_step(input_ids, labels, positions)
        global_tokens = self._global_tokens(labels)
        inv_tokens = 1.0 / max(global_tokens, 1)
        if self.ds_engine is not None:
            local_ce = self._deepspeed_step(input_ids, labels, positions, inv_tokens)
        else:
            # Gradient reductions average over dp; scale back up so they sum (see module doc).
            self._loss_scale = self.dp_size * inv_tokens
            with self._maybe_autocast():
                local_ce = self._pipeline_step(input_ids, labels, positions) if self.schedule is not None \
                    else self._micro_batch_step(input_ids, labels, positions)
        return {"loss": self._global_ce(local_ce) * inv_tokens, "tokens": global_tokens}

    def _custom_loss_step(self, input_ids, labels, positions) -> dict[str, float | int]:
        """forward_backward with loss_fn: its target count is known only once the loss ran, so
        the backward runs on the summed loss (x dp: reductions average over dp) and the
        gradients are divided by the global count afterwards (one pass over this rank's grads)."""
        self._loss_scale, self._counts = float(self.dp_size), []
        with self._maybe_autocast():
            local_ce = self._pipeline_step(input_ids, labels, positions) if self.schedule is not None \
                else self._micro_batch_step(input_ids, labels, positions)
        global_count = self._global_count()
        inv = 1.0 / max(global_count, 1.0)
        with torch.no_grad():
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(inv)
        return {"loss": self._global_ce(local_ce) * inv, "tokens": int(global_count)}

    def _global_count(self) -> float:
        """The custom loss's targets over every rank (only last-stage ranks count under pp)."""
        local = sum(self._counts[-self.plan.grad_accum:]) if self.schedule is not None else sum(self._counts)
        return self._global_ce(torch.tensor(float(local), device=self.device))

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, vocab_mesh) -> torch.Tensor:
        """Summed loss of one micro-batch: next-token cross-entropy, or loss_fn (set_loss_fn)."""
        if self.loss_fn is None:
            return summed_causal_lm_loss(logits, labels, vocab_mesh)
        from torch.distributed.tensor import DTensor, Shard

        if vocab_mesh is not None and not isinstance(logits, DTensor):
            logits = DTensor.from_local(logits, vocab_mesh, [Shard(logits.dim() - 1)], run_check=False)
        loss, count = self.loss_fn(logits, labels.to(logits.device))
        self._counts.append(float(count))
        return loss.to_local() if isinstance(loss, DTensor) else loss

    def _global_tokens(self, labels: torch.Tensor) -> int:
        # Sync point 1: the global target-token count (dp axis only: tp/pp peers hold the same rows).
        tokens = torch.tensor([count_target_tokens(labels)], dtype=torch.float64, device=self.device)
        dist.all_reduce(tokens, group=self._dp_group)
        return int(tokens.item())

    def _global_ce(self, local_ce: torch.Tensor) -> float:
        # Sync point 2: the summed CE over every rank (only last-stage ranks hold CE).
        ce = local_ce.detach().to(self.device, torch.float64).reshape(1)
        if self._pp_group is not None:
            dist.all_reduce(ce, group=self._pp_group)
        dist.all_reduce(ce, group=self._dp_group)
        return float(ce.item())

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, float | int]:
        """Forward only over this dp rank's rows (no gradient, no optimizer state touched): the
        global mean loss over every non-ignored token of the global batch, and that count.
        Pipeline layouts take the training shape (micro_batch_size * grad_accum rows: the
        schedule's micro-batch count is fixed); the others any number of rows, in micro-batches."""
        from raytune_llama.engine.loss import loss_parallel_context

        from .tensor_parallel import vocab_parallel_mesh

        input_ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        positions = _positions(batch, self.device)
        mbs = self.plan.micro_batch_size
        if self.schedule is not None and input_ids.shape[0] != mbs * self.plan.grad_accum:
            raise ValueError(f"evaluation batch has {input_ids.shape[0]} rows; a pipeline layout evaluates the "
                             f"training shape, micro_batch_size * grad_accum = {mbs} * {self.plan.grad_accum} = "
                             f"{mbs * self.plan.grad_accum} rows per dp rank")
        global_tokens = self._global_tokens(labels) if self.loss_fn is None else None
        self._counts = []
        if self.schedule is not None:
            self._loss_scale = 1.0
            with self._maybe_autocast():
                local_ce = self._pipeline_step(input_ids, labels, positions, backward=False)
        else:
            module = self.ds_engine if self.ds_engine is not None else self.modules[0]
            vocab_mesh = None if self.ds_engine is not None else vocab_parallel_mesh(self.plan, self.mesh,
                                                                                     self.stages[0].config)
            local_ce = torch.zeros((), device=self.device)
            with self._maybe_autocast(), loss_parallel_context(vocab_mesh):
                for i in range(0, input_ids.shape[0], mbs):
                    logits = _run(module, input_ids, positions, i, i + mbs)
                    local_ce = local_ce + self._loss(logits, labels[i:i + mbs], vocab_mesh)
        if global_tokens is None:  # loss_fn counted its own targets
            global_tokens = int(self._global_count())
        return {"loss": self._global_ce(local_ce) / max(global_tokens, 1), "tokens": global_tokens}

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Forward only: full-vocabulary logits [rows, seq, vocab] of this rank's rows, in
        micro-batches (tensor parallel: the vocab shards are all-gathered over tp); with
        position_ids (document packing) attention stays inside each document. Not under
        pipeline parallel, where they exist on the last stage only."""
        from torch.distributed.tensor import DTensor

        if self.schedule is not None:
            raise ValueError("logits are not available on a pipeline-parallel layout (only the last stage holds "
                             "them); evaluate with labels= for the global loss, or export the model "
                             "(save_pretrained) and run it with transformers for logits")
        input_ids = input_ids.to(self.device)
        positions = None if position_ids is None else position_ids.to(self.device)
        module, mbs = (self.ds_engine if self.ds_engine is not None else self.modules[0]), self.plan.micro_batch_size
        parts = []
        with self._maybe_autocast():
            for i in range(0, input_ids.shape[0], mbs):
                out = _run(module, input_ids, positions, i, i + mbs)
                parts.append((out.full_tensor() if isinstance(out, DTensor) else self._gather_vocab(out)).float())
        return torch.cat(parts)

    def _gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Plain-tensor logits that are this rank's vocab shard (loss parallel) → full vocabulary."""
        from .tensor_parallel import vocab_parallel_mesh

        vocab_mesh = None if self.ds_engine is not None else vocab_parallel_mesh(self.plan, self.mesh,
                                                                                 self.stages[0].config)
        if vocab_mesh is None:
            return logits
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(logits, vocab_mesh, [Shard(logits.dim() - 1)], run_check=False).full_tensor()

    def optimizer_step(self, optimizer=None) -> float:
        """Clip (max_grad_norm) and apply the update with the engine's AdamW, or with
        `optimizer` (e.g. the user's own over `parameters()`); returns the pre-clip grad norm."""
        if self.ds_engine is not None:
            self.ds_engine.step()  # the accumulation boundary: DeepSpeed clips and updates
            grad_norm = self.ds_engine.get_global_grad_norm()
            return float(grad_norm) if grad_norm is not None else float("nan")
        grad_norm = clip_grad_norm(self.parameters(), self.max_grad_norm, self._pp_group)
        (optimizer or self.optimizer).step()
        return grad_norm

    # -- step internals ---------------------------------------------------------------------
    def _maybe_autocast(self):
        if self._autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16)
        return torch.autocast(self.device.type, enabled=False)

    def _micro_batch_step(self, input_ids, labels, positions=None) -> torch.Tensor:
        from raytune_llama.engine.loss import loss_parallel_context

        from .tensor_parallel import vocab_parallel_mesh

        module, ga, mbs = self.modules[0], self.plan.grad_accum, self.plan.micro_batch_size
        # Under TP the logits are this rank's vocab shard: loss_parallel() must cover the
        # cross-entropy's forward AND backward (engine/loss.py).
        vocab_mesh = vocab_parallel_mesh(self.plan, self.mesh, self.stages[0].config)
        total = torch.zeros((), device=self.device)
        with loss_parallel_context(vocab_mesh):
            for i in range(ga):
                last = i == ga - 1
                lab = labels[i * mbs:(i + 1) * mbs]
                self._set_grad_sync(module, last)
                ce = self._loss(_run(module, input_ids, positions, i * mbs, (i + 1) * mbs), lab, vocab_mesh)
                (ce * self._loss_scale).backward()
                total = total + ce.detach()
        return total

    def _set_grad_sync(self, module, last: bool) -> None:
        # DDP and ZeRO-1 all-reduce once, after the last micro-batch; ZeRO-2/3 reduce-scatter
        # every micro-batch so that only gradient shards are ever accumulated.
        if not self.plan.syncs_gradients_once:
            return
        if isinstance(module, DistributedDataParallel):
            module.require_backward_grad_sync = last
        elif isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(last)

    def _pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Stages exchange plain tensors: under TP `logits` is this rank's vocab shard, turned
        # back into a Shard(-1) DTensor over the tp mesh (set by _pipeline_step) for the loss.
        ce = self._loss(logits, labels, self._pp_vocab_mesh)
        self._pp_ce.append(ce.detach())
        return ce * self._loss_scale

    def _pipeline_step(self, input_ids, labels, positions=None, backward: bool = True) -> torch.Tensor:
        from raytune_llama.engine.loss import loss_parallel_context

        from .tensor_parallel import vocab_parallel_mesh

        self._pp_ce = []
        holds_first = 0 in self.stage_ids
        holds_last = (self.plan.pp * self.plan.virtual_stages - 1) in self.stage_ids
        self._pp_vocab_mesh = vocab_parallel_mesh(self.plan, self.mesh, self.stages[-1].config)
        if positions is None:  # every stage takes position ids (pipeline.py)
            positions = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids).contiguous()
        args = (input_ids, positions) if holds_first else ()
        # The schedule runs every micro-batch's loss forward and backward inside step(); eval()
        # runs the forwards and the losses only.
        with loss_parallel_context(self._pp_vocab_mesh):
            if backward:
                self.schedule.step(*args, target=labels if holds_last else None, return_outputs=False)
            else:
                self.schedule.eval(*args, target=labels if holds_last else None)
        if not self._pp_ce:
            return torch.zeros((), device=self.device)
        # The first step's stage initialisation runs the loss once more for shape inference:
        # only the last grad_accum calls are this step's micro-batches.
        return torch.stack(self._pp_ce[-self.plan.grad_accum:]).sum()

    def _deepspeed_step(self, input_ids, labels, positions, inv_tokens: float) -> torch.Tensor:
        eng, ga, mbs = self.ds_engine, self.plan.grad_accum, self.plan.micro_batch_size
        # DeepSpeed divides by gradient_accumulation_steps and averages over dp: undo both.
        scale = inv_tokens * ga * self.dp_size
        total = torch.zeros((), device=self.device)
        for i in range(ga):
            lab = labels[i * mbs:(i + 1) * mbs]
            ce = summed_causal_lm_loss(_run(eng, input_ids, positions, i * mbs, (i + 1) * mbs), lab)
            eng.backward(ce * scale)
            if i < ga - 1:
                eng.step()  # not a boundary: DeepSpeed only counts the micro-step
            total = total + ce.detach()
        return total  # optimizer_step() makes the boundary step

    # -- checkpoint state -------------------------------------------------------------------
    @contextlib.contextmanager
    def using_optimizer(self, optimizer=None):
        """Within: get_state / set_state (checkpoints) save and load `optimizer` (a user's own
        torch optimizer over `parameters()`, the one-line API) instead of the engine's AdamW.
        DeepSpeed layouts keep their own: the user's AdamW hands its steps to it."""
        if optimizer is None or self.ds_engine is not None:
            yield
            return
        own, self.optimizer = self.optimizer, optimizer
        try:
            yield
        finally:
            self.optimizer = own

    def get_state(self, full: bool = False):
        """(model_state, optimizer_state) with HF FQNs; full=True gathers dp/tp shards to CPU tensors."""
        from .state import get_engine_state

        return get_engine_state(self, full)

    def set_state(self, model_state, optim_state=None, full: bool = False) -> None:
        """Load state produced by `get_state` (same `full`); pipeline ranks take their own keys."""
        from .state import set_engine_state

        set_engine_state(self, model_state, optim_state, full)

    def close(self) -> None:
        """Drop references (DeepSpeed keeps global state) so a new engine can be built in-process."""
        self.schedule = None
        if self.ds_engine is not None:
            self.ds_engine.destroy()
            self.ds_engine = None


def _positions(batch: dict, device: torch.device) -> torch.Tensor | None:
    """The batch's per-document position ids (document packing), or None (0..S-1 in every row)."""
    positions = batch.get("position_ids")
    return None if positions is None else positions.to(device)


def _run(module, input_ids: torch.Tensor, positions: torch.Tensor | None, lo: int, hi: int):
    """Forward rows lo:hi, with their position ids when the batch has them."""
    if positions is None:
        return module(input_ids[lo:hi])
    return module(input_ids[lo:hi], positions[lo:hi])
