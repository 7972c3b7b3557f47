"""What `from_pretrained` returns after `enable_advanced_parallelization()` (engine/one_line.py):
`ParallelCausalLM`, an HF-style causal LM facade over a ParallelEngine. Its forward trains (forward
and backward over this dp rank's micro-batches) or, under no_grad / eval(), evaluates; it offers
the HF methods fine-tuning scripts call (save_pretrained as a streamed, collective export,
num_parameters, get_input_embeddings, generation_config, gradient checkpointing switches that
defer to the plan) and an AttributeError that says what to do for anything else.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, ContextManager, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


class ParallelCausalLM(nn.Module):
    """What `from_pretrained` returns after the one line: an HF-style causal LM facade over
    a ParallelEngine."""

    step_guard: Optional[Callable[[], ContextManager]] = None
    """Set by the Ray layer for a user's loop (trainer/user_loop.py guard_user_loop): each
    training forward (the step's collectives) runs inside step_guard(), the run's step watchdog."""

    def __init__(self, engine, config, model_path: Optional[str] = None):
        super().__init__()
        self.engine = engine
        self.config = config
        self.model_path = model_path  # the folder the weights came from (config.json, generation_config.json)
        self.stages = nn.ModuleList(engine.stages)  # zero_grad / train / state_dict see them
        self.pending_norms: list[torch.Tensor] = []  # DeepSpeed: clip_grad_norm_ results filled at the step

    # -- the HF model methods fine-tuning scripts call --------------------------------------
    def save_pretrained(self, save_directory, max_shard_size="5GB", safe_serialization: bool = True, **kwargs):
        """Collective (every rank calls it, as in a Ray Train loop): write the current weights as
        an HF model folder (safetensors parts of at most `max_shard_size`, index, config.json)
        without any rank holding the whole model (engine/export.py); loadable by from_pretrained."""
        from raytune_llama.engine.export import export_model_streaming

        if kwargs or not safe_serialization:
            raise TypeError(f"save_pretrained on the parallelized model takes save_directory and max_shard_size "
                            f"(safetensors only); got {sorted(kwargs) or 'safe_serialization=False'}")
        if self.model_path is None:
            raise RuntimeError("save_pretrained needs the folder the model was loaded from (from_pretrained sets it)")
        return export_model_streaming(self.engine, self.model_path, None, save_directory,
                                      max_shard_bytes=_shard_bytes(max_shard_size))

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the plan recomputes activations (full or selective)."""
        return self.engine.plan.recompute != "none"

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Activation recompute is part of the plan (chosen to fit memory at the best speed), not
        switched on the built model: this logs what the plan does and how to force full recompute."""
        if self.is_gradient_checkpointing:
            log.info("gradient checkpointing: the plan already recomputes activations (recompute=%s)",
                     self.engine.plan.recompute)
        else:
            log.warning("gradient_checkpointing_enable(): the plan fits without recompute (recompute=none) and runs "
                        "faster that way; to force it, pass the layout with recompute=full to "
                        "enable_advanced_parallelization(plan=...)")

    def gradient_checkpointing_disable(self) -> None:
        """See gradient_checkpointing_enable: recompute is part of the plan."""
        if self.is_gradient_checkpointing:
            log.warning("gradient_checkpointing_disable(): the plan needs recompute=%s to fit memory; to run "
                        "without it, pass a layout with recompute=none to enable_advanced_parallelization(plan=...)",
                        self.engine.plan.recompute)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the whole model (every rank's shards and stages together), as HF counts them."""
        from raytune_llama.engine.parallel.sharded_load import meta_model

        full = meta_model(self.config)
        skip = {id(m.weight) for m in full.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in full.parameters() if id(p) not in skip)

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding (this rank's shard of it), on the rank that holds the first stage."""
        for stage in self.engine.stages:
            if stage.is_first:
                return stage.model.embed_tokens
        raise RuntimeError("get_input_embeddings(): the embedding lives on the first pipeline stage, which this "
                           "rank does not hold; call it on the first stage's ranks (pipeline rank 0)")

    @property
    def generation_config(self):
        """The source model's generation_config.json, else one derived from its config."""
        from transformers import GenerationConfig

        if self.model_path and os.path.isfile(os.path.join(self.model_path, "generation_config.json")):
            return GenerationConfig.from_pretrained(self.model_path)
        return GenerationConfig.from_model_config(self.config)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            raise AttributeError(
                f"{name!r} is not available on the parallelized model (raytune_llama.ParallelCausalLM): it offers "
                f"forward/__call__ for training steps, parameters(), named_parameters(), save_pretrained(), "
                f"num_parameters(), "
                f"get_input_embeddings(), gradient_checkpointing_enable()/disable(), config, generation_config, "
                f"train()/eval(); for anything else export it (save_pretrained) and load the export with "
                f"transformers") from None

    def parameters(self, recurse: bool = True):
        """This rank's parameters (shards), each once: what an optimizer should step."""
        return iter(self.engine.parameters())

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """This rank's parameters (shards) with the HF model's names, e.g. to put norms and
        biases in a param group without weight decay."""
        return iter((f"{prefix}.{name}" if prefix else name, p) for name, p in self.engine.named_parameters())

    def cuda(self, device=None):
        """Already on the worker's device."""
        return self

    def to(self, *args, **kwargs):
        """Already on the worker's device (dtype is set by the plan's mixed precision)."""
        return self

    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, position_ids=None,
                **kwargs):
        """Forward + backward on this rank's rows; returns an output whose .loss / [0] is the
        global token-mean loss (already back-propagated). position_ids that restart at 0 per
        document (document packing, as get_dataset_shard yields them) keep attention inside
        each document."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        evaluating = not torch.is_grad_enabled() or not self.training
        if input_ids is None or (labels is None and not evaluating):
            raise ValueError("the parallelized model trains on (input_ids, labels): pass labels= "
                             "(the input ids with padding set to -100); without labels it returns logits "
                             "under torch.no_grad() or model.eval() only")
        _check_right_padding(attention_mask)
        if position_ids is None:
            position_ids = positions_of_served_batch(input_ids)
        input_ids, labels, position_ids = self._rows_of_this_rank(input_ids, labels, evaluating, position_ids)
        if evaluating and labels is None:
            # As HF: no labels, logits (full vocabulary, this rank's rows; not under pipeline parallel).
            return CausalLMOutputWithPast(logits=self.engine.logits(input_ids, position_ids))
        batch = {"input_ids": input_ids, "labels": labels}
        if position_ids is not None:
            batch["position_ids"] = position_ids
        if evaluating:
            # Evaluation: forward only, gradients and optimizer state untouched; the global
            # loss (logits: call without labels).
            stats = self.engine.evaluate(batch)
            return CausalLMOutputWithPast(loss=torch.tensor(stats["loss"], device=self.engine.device))
        guard = type(self).step_guard
        with guard() if guard is not None else contextlib.nullcontext():
            stats = self.engine.forward_backward(batch)
        loss = torch.tensor(stats["loss"], device=self.engine.device, requires_grad=True)
        return CausalLMOutputWithPast(loss=loss)


    def _rows_of_this_rank(self, input_ids, labels, evaluating: bool, position_ids=None):
        """A loop may pass this dp rank's share of the global batch (raytune_llama.get_dataset_shard)
        or, from its own DataLoader iterated alike on every rank, the whole global batch: then
        this rank's contiguous share is taken. Training needs one of those two sizes."""
        plan, engine = self.engine.plan, self.engine
        share = plan.micro_batch_size * plan.grad_accum
        rows = input_ids.shape[0]
        if engine.dp_size > 1 and rows == share * engine.dp_size:
            lo, hi = engine.dp_rank * share, (engine.dp_rank + 1) * share
            return tuple(None if t is None else t[lo:hi] for t in (input_ids, labels, position_ids))
        if rows != share and not (evaluating and plan.pp == 1):
            raise ValueError(
                f"batch has {rows} rows; the plan ({plan.describe()}) takes {share * engine.dp_size} rows per step "
                f"when every rank passes the same global batch ({engine.dp_size} data-parallel ranks x "
                f"micro_batch_size {plan.micro_batch_size} x grad_accum {plan.grad_accum}), or {share} when each "
                f"rank passes its own share (raytune_llama.get_dataset_shard); set the DataLoader's batch_size "
                f"to {share * engine.dp_size} (drop_last=True), or plan for {rows}: "
                f"enable_advanced_parallelization(global_batch_size={rows})")
        return input_ids, labels, position_ids


_served: dict = {"input_ids": None, "position_ids": None}


def serve_batch_positions(input_ids: torch.Tensor, position_ids: Optional[torch.Tensor]) -> None:
    """Remember the position ids of the batch raytune_llama.get_dataset_shard just yielded
    (document packing), for a loop that passes only input_ids to the model."""
    _served.update(input_ids=input_ids, position_ids=position_ids)


def positions_of_served_batch(input_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """The served batch's position ids when `input_ids` is that batch (the loop may have moved
    it to the device): a plain loop written for one device keeps attention inside each packed
    document without passing position_ids. None otherwise."""
    served, positions = _served["input_ids"], _served["position_ids"]
    if positions is None or served is None or served.shape != input_ids.shape:
        return None
    return positions if torch.equal(served, input_ids.detach().to(served.device)) else None


def _shard_bytes(size) -> int:
    """HF's max_shard_size: an int (bytes) or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for suffix, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                           ("KB", 10**3), ("B", 1)):
        if text.endswith(suffix):
            try:
                return int(float(text[: -len(suffix)]) * factor)
            except ValueError:
                break
    raise ValueError(f"max_shard_size: {size!r} is not a size; give bytes or e.g. '5GB', '500MB'")


def _check_right_padding(attention_mask: Optional[torch.Tensor]) -> None:
    if attention_mask is None:
        return
    mask = attention_mask.to(torch.int64)
    # Right padding: within a row, a 0 is never followed by a 1.
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("attention_mask has left padding; the parallelized model needs right padding "
                         "(pad at the end of each row, labels -100 there)")
