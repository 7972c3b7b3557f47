"""The one-line API: after `enable_advanced_parallelization()`, a plain single-device loop

    model = AutoModelForCausalLM.from_pretrained(path)
    optim = AdamW(model.parameters(), lr=...)
    loss = model(input_ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda())[0]
    loss.backward(); optim.step(); model.zero_grad(set_to_none=True)

runs on any ParallelPlan. `from_pretrained` returns a `ParallelCausalLM`
(engine/parallel_causal_lm.py): the model laid out by a ParallelEngine (each rank loading only
its own shards where the layout shards it). This module holds the patches and the plan choice.

What happens where (and what a loop may do):
* The forward call runs forward AND backward over this data-parallel rank's micro-batches
  (pipeline schedules and gradient accumulation need both in one pass), then returns the
  global mean loss over every non-ignored token as a tensor whose `backward()` is a no-op.
  So `loss.backward()` is correct to call, but a loss computed by the loop from logits is not
  supported: there are no logits to take, and the backward has already happened. A different
  loss goes through `enable_advanced_parallelization(loss_fn=...)` (not yet offered) or the
  `ParallelEngine` API directly.
* `optim.step()` with a stock optimizer over `model.parameters()` updates the (sharded)
  parameters. `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)` returns and clips
  by the global norm on every layout: DTensor gradients (FSDP, TP) reduce over their mesh,
  replicated ones (TP without SP: the norms) count once and are scaled mesh by mesh, and under
  pipeline parallel the stages' norms are combined (torch's `_get_total_norm` and
  `_clip_grads_with_norm_` are patched, so `from torch.nn.utils import clip_grad_norm_` works
  too). DeepSpeed layouts route the step to DeepSpeed (with the optimizer's learning rate); there `torch.nn.utils.clip_grad_norm_`
  hands the clipping to DeepSpeed's step and its returned tensor holds the global pre-clip norm
  once `optim.step()` has run (NaN before).
* Evaluation: under `torch.no_grad()` or after `model.eval()`, `model(input_ids, labels=...)`
  runs forward only and returns the global token-mean loss (no logits: they are vocab-sharded
  and spread over micro-batches and stages); gradients and optimizer state are untouched.
* HF methods: `save_pretrained` (collective, streamed export), `num_parameters`,
  `get_input_embeddings`, `generation_config`, `gradient_checkpointing_enable/disable` (log only:
  recompute belongs to the plan); any other attribute raises an AttributeError saying what to do.
* `.cuda()` lands tensors on the worker's device (CPU workers included).
* Padding must be on the right (packed data has it only at the tail); the attention mask is
  checked for that and otherwise only its padding is honoured through the labels (-100).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Optional

import torch
from torch.nn.utils import clip_grad as clip_grad_module
from torch.optim.optimizer import register_optimizer_step_pre_hook

from raytune_llama.engine.parallel_causal_lm import ParallelCausalLM
from raytune_llama.planner.plan import ParallelPlan

log = logging.getLogger(__name__)
PLAN_ENV = "RAYTUNE_LLAMA_PLAN"

_state: dict[str, Any] = {"enabled": False, "options": {}, "originals": {}, "proxies": []}


def resolve_plan(model_config, explicit=None, global_batch: Optional[int] = None,
                 seq_len: Optional[int] = None) -> ParallelPlan:
    """The plan to apply: explicit argument, else the driver's plan (RAYTUNE_LLAMA_PLAN) when
    it is for `global_batch` (or none is asked for), else one made here by the planner for this
    world size and `global_batch` sequences of `seq_len` per step (default: one per rank)."""
    if isinstance(explicit, ParallelPlan):
        return explicit
    if isinstance(explicit, dict):
        return ParallelPlan.from_dict(explicit)
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get(PLAN_ENV) and explicit is None:
        driver = ParallelPlan.from_dict(json.loads(os.environ[PLAN_ENV]))
        if driver.world_size != world:  # an elastic resize since the driver planned: same global batch
            log.warning("the driver's plan (%s) is for %d workers, this worker group has %d: re-planning",
                        driver.describe(), driver.world_size, world)
            global_batch = global_batch or driver.global_batch()
        elif global_batch is None or driver.global_batch() == global_batch:
            return driver

    from raytune_llama.engine.device_info import hardware_profile_name
    from raytune_llama.planner.api import estimate, plan
    from raytune_llama.planner.model_spec import from_hf_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nodes, per_node = _launch_topology(world)
    cluster = {"hardware": hardware_profile_name(device) or "h100", "nodes": nodes, "devices_per_node": per_node}
    seq_len = seq_len or min(int(getattr(model_config, "max_position_embeddings", 2048) or 2048), 4096)
    workload = {"seq_len": seq_len, "global_batch": global_batch or world}
    spec = from_hf_config(model_config.to_dict())
    if isinstance(explicit, str):
        est = estimate(spec, cluster=cluster, workload=workload, layout=explicit)
        if not est.feasible:
            raise ValueError(f"layout {explicit!r} cannot run here: {'; '.join(est.reasons)}")
        return est.plan
    return plan(spec, cluster=cluster, workload=workload).plan


def _launch_topology(world: int) -> tuple[int, int]:
    """(nodes, devices per node) of the process group, from every rank's host and node rank
    (NODE_RANK from Ray Train, GROUP_RANK from torchrun), gathered so that every rank plans
    on the same; one node without a process group."""
    import socket

    import torch.distributed as dist

    from raytune_llama.planner.cluster import topology_of_ranks
    from raytune_llama.planner.errors import PlanError

    if world == 1 or not dist.is_initialized():
        return 1, world
    keys: list = [None] * world
    dist.all_gather_object(keys, (socket.gethostname(), os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", ""))))
    try:
        return topology_of_ranks(keys)
    except PlanError as exc:
        raise ValueError(f"cannot plan a layout for this process group: {exc}") from exc


def _from_pretrained(cls, name_or_path, *args, **kwargs):
    """Patched AutoModelForCausalLM.from_pretrained: build the model laid out per the plan."""
    from transformers import AutoConfig

    from raytune_llama.engine.hf_cache import resolve_pretrained
    from raytune_llama.engine.model_io import build_engine
    from raytune_llama.engine.parallel.engine import check_loss_fn
    from raytune_llama.engine.parallel.mesh import init_distributed

    opts = _state["options"]
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    init_distributed(device_type)
    unsupported = sorted(set(kwargs) - {"cache_dir", "revision", "dtype", "torch_dtype", "token"})
    if args or unsupported:
        raise TypeError(f"from_pretrained after enable_advanced_parallelization() takes the model plus "
                        f"cache_dir=, revision= (dtype=, torch_dtype= and token= are accepted and ignored); got "
                        f"{len(args)} positional argument(s) and {unsupported}. The training dtype is set by "
                        f"enable_advanced_parallelization(master_weights=..., mixed_precision=...)")
    # A hub id: its snapshot in the HF cache (kwargs dtype/token are ignored: fp32 masters, offline).
    path = str(resolve_pretrained(str(name_or_path), cache_dir=kwargs.get("cache_dir"),
                                  revision=kwargs.get("revision")))
    config = AutoConfig.from_pretrained(path)
    plan = resolve_plan(config, opts.get("plan"), opts.get("global_batch_size"), opts.get("seq_len"))
    check_loss_fn(plan, opts.get("loss_fn"))
    with _unpatched_from_pretrained():  # the engine loads weights through the real one
        engine = build_engine(path, plan, device_type=device_type, lr=0.0, weight_decay=0.0,
                              betas=(0.9, 0.95), max_grad_norm=0.0, mixed_precision=opts.get("mixed_precision"),
                              master_weights=opts.get("master_weights", "fp32"))
    engine.set_loss_fn(opts.get("loss_fn"))
    proxy = ParallelCausalLM(engine, config, path)
    _state["proxies"].append(proxy)
    log.info("raytune_llama: %s laid out as %s", name_or_path, plan.describe())
    return proxy


@contextlib.contextmanager
def _unpatched_from_pretrained():
    from transformers import AutoModelForCausalLM

    patched = AutoModelForCausalLM.__dict__["from_pretrained"]
    _restore_from_pretrained(AutoModelForCausalLM)
    try:
        yield
    finally:
        AutoModelForCausalLM.from_pretrained = patched


def _restore_from_pretrained(cls) -> None:
    original = _state["originals"]["from_pretrained"]
    if original is None:
        del cls.from_pretrained  # it was inherited
    else:
        cls.from_pretrained = original


def _owner(optimizer) -> Optional[ParallelCausalLM]:
    return _deepspeed_proxy([p for group in optimizer.param_groups for p in group["params"]])


def _adamw_step(self, *args, **kwargs):
    """Patched AdamW.step: DeepSpeed layouts step inside DeepSpeed (with this lr)."""
    proxy = _owner(self)
    if proxy is None:
        return _state["originals"]["adamw_step"](self, *args, **kwargs)
    for group, settings in zip(proxy.engine.optimizer.param_groups, _deepspeed_group_settings(proxy, self)):
        group.update(settings)
    grad_norm = proxy.engine.optimizer_step()
    for norm in proxy.pending_norms:  # what clip_grad_norm_ returned before this step
        norm.fill_(grad_norm)
    if proxy.pending_norms:  # the clip applied to this step only, as torch's clip_grad_norm_ does
        _set_deepspeed_clipping(proxy, 0.0)
    proxy.pending_norms.clear()
    return None


def _set_deepspeed_clipping(proxy: ParallelCausalLM, max_norm: float) -> None:
    """Clip the next DeepSpeed step at max_norm (0: no clipping; the one-line engine has none)."""
    ds = proxy.engine.ds_engine
    ds._config.gradient_clipping = float(max_norm)
    if hasattr(ds.optimizer, "clip_grad"):
        ds.optimizer.clip_grad = float(max_norm)


HYPERPARAMETERS = ("lr", "weight_decay", "betas", "eps")


def _deepspeed_group_settings(proxy: ParallelCausalLM, optimizer) -> list[dict]:
    """The user's hyperparameters for each of DeepSpeed's param groups. DeepSpeed keeps the
    groups it was built with (engine/parallel/optim.py adamw_param_groups: matrices, then 1-D
    norms and biases); each takes the settings of the user's group holding its parameters.
    A user grouping that splits one of them with different settings, or leaves some parameters
    out, cannot be honoured: refused, naming the groups and the fix."""
    from raytune_llama.engine.parallel.optim import adamw_param_groups

    holder = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    out = []
    for index, ours in enumerate(adamw_param_groups(proxy.engine.ds_engine.module.named_parameters(), 0.0)):
        users = {holder.get(id(p)) for p in ours["params"]}
        kind = "matrices and embeddings" if index == 0 else "1-D norms and biases"
        if None in users:
            raise ValueError(f"optimizer: on a DeepSpeed layout the optimizer must hold every parameter of "
                             f"model.parameters() (some {kind} are missing); freeze parameters before "
                             f"enable_advanced_parallelization's from_pretrained, or use a torch layout")
        settings = {tuple(optimizer.param_groups[i][k] if k != "betas" else tuple(optimizer.param_groups[i][k])
                          for k in HYPERPARAMETERS) for i in users}
        if len(settings) > 1:
            raise ValueError(
                f"optimizer: on a DeepSpeed layout the {kind} share one DeepSpeed param group, but your "
                f"optimizer's groups {sorted(users)} give them different settings "
                f"{[dict(zip(HYPERPARAMETERS, s)) for s in sorted(settings)]}; give matrices and 1-D parameters "
                f"(norms, biases) one group each, or use a torch layout (parallel.layout ... backend=torch)")
        out.append(dict(zip(HYPERPARAMETERS, settings.pop())))
    return out


def _engine_holding(tensors) -> Optional[Any]:
    """The engine whose parameters' gradients are exactly `tensors` (a loop's clip over
    model.parameters()), if any."""
    ids = {id(t) for t in tensors}
    if not ids:
        return None
    for proxy in _state["proxies"]:
        if ids == {id(p.grad) for p in proxy.engine.parameters() if p.grad is not None}:
            return proxy.engine
    return None


def _global_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """Patched torch.nn.utils.clip_grad._get_total_norm (what clip_grad_norm_ and
    get_total_norm call, however they were imported): for the gradients of a parallelized model
    the norm covers every rank as the single-process loop's does (optim.global_grad_norm: DTensor
    gradients reduce over their mesh, replicated ones count once, pipeline stages combine)."""
    from raytune_llama.engine.parallel.optim import global_grad_norm

    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    engine = _engine_holding(tensors)
    if engine is None:
        return _state["originals"]["get_total_norm"](tensors, norm_type, error_if_nonfinite, foreach)
    total = global_grad_norm(tensors, engine._pp_group, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} for gradients is non-finite, so it cannot be "
                           f"clipped; set error_if_nonfinite=False to clip anyway")
    return total


def _clip_with_norm(parameters, max_norm, total_norm, foreach=None):
    """Patched torch.nn.utils.clip_grad._clip_grads_with_norm_: a parallelized model's gradients
    are scaled one mesh at a time (torch's foreach kernels refuse mixed meshes)."""
    from raytune_llama.engine.parallel.optim import clip_grads_by_mesh

    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if _engine_holding([p.grad for p in params if p.grad is not None]) is None:
        return _state["originals"]["clip_with_norm"](params, max_norm, total_norm, foreach)
    clip_grads_by_mesh(params, max_norm, total_norm)
    return None


def _clip_grad_norm(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """Patched torch.nn.utils.clip_grad_norm_: under DeepSpeed the gradients live in DeepSpeed's
    partitions, not in `.grad`, so the clipping is handed to DeepSpeed's step (same formula:
    scale by max_norm / (norm + 1e-6) when above 1) and the returned tensor receives the global
    pre-clip norm when `optimizer.step()` has run (NaN until then). Elsewhere torch's own."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    proxy = _deepspeed_proxy(params)
    if proxy is None:
        return _state["originals"]["clip_grad_norm"](params, max_norm, norm_type, error_if_nonfinite, foreach)
    if float(norm_type) != 2.0:
        raise ValueError(f"clip_grad_norm_(norm_type={norm_type}) on a DeepSpeed layout: DeepSpeed clips by the "
                         f"L2 norm only; use norm_type=2 or a torch layout (parallel.layout ... backend=torch)")
    _set_deepspeed_clipping(proxy, max_norm)
    norm = torch.full((), float("nan"), device=proxy.engine.device)
    proxy.pending_norms.append(norm)
    return norm


def _clip_grad_value(parameters, clip_value, foreach=None):
    """Patched torch.nn.utils.clip_grad_value_: element-wise, so right on every torch layout as
    it is; under DeepSpeed the gradients are not in `.grad`, so refused instead of doing nothing."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if _deepspeed_proxy(params) is not None:
        raise ValueError("clip_grad_value_ on a DeepSpeed layout: DeepSpeed keeps the gradients in its own "
                         "partitions and clips by norm only; use clip_grad_norm_, or a torch layout "
                         "(parallel.layout ... backend=torch)")
    return _state["originals"]["clip_grad_value"](params, clip_value, foreach)


def _deepspeed_proxy(params) -> Optional[ParallelCausalLM]:
    """The model on a DeepSpeed layout that holds any of `params`, if any."""
    ids = {id(p) for p in params}
    for proxy in _state["proxies"]:
        if proxy.engine.ds_engine is not None and ids & {id(p) for p in proxy.engine.parameters()}:
            return proxy
    return None


def _refuse_other_optimizers_on_deepspeed(optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook: on a DeepSpeed layout DeepSpeed steps its own AdamW (the
    patched AdamW.step hands the step over); any other optimizer would step parameters
    DeepSpeed owns behind its back, so it is refused before it changes anything."""
    if not isinstance(optimizer, torch.optim.AdamW) and _owner(optimizer) is not None:
        raise ValueError(f"optimizer: {type(optimizer).__name__} on a DeepSpeed layout; DeepSpeed steps its own "
                         f"AdamW, so use torch.optim.AdamW, or a torch layout (parallel.layout ... backend=torch) "
                         f"for any other optimizer")


def _tensor_cuda(self, device=None, non_blocking=False, **kwargs):
    """Patched Tensor.cuda on machines without CUDA: the tensor stays on the CPU."""
    return self


def enable_advanced_parallelization(plan=None, *, mixed_precision: Optional[str] = None,
                                    master_weights: str = "fp32", loss_fn=None,
                                    global_batch_size: Optional[int] = None, seq_len: Optional[int] = None) -> None:
    """The one line: from here on, AutoModelForCausalLM.from_pretrained returns the model laid
    out per `plan` (a ParallelPlan, dict or layout string), the driver's plan, or the
    planner's choice for this world size; trained in fp32 master weights (or pure bf16 with
    master_weights="bf16") and computed in `mixed_precision` ("bf16" or None = fp32).
    loss_fn(logits, labels) -> (summed loss, number of targets) replaces next-token
    cross-entropy inside the engine's schedule on every torch layout (ParallelEngine.set_loss_fn).
    global_batch_size / seq_len: what the loop's own DataLoader yields per step (every rank the
    same global batch; the model takes its dp rank's rows), so that the plan is made for it."""
    from transformers import AutoModelForCausalLM

    from raytune_llama.engine.model_io import master_dtype

    master_dtype(master_weights)  # a bad value fails here, not at from_pretrained
    # optim binds torch's own norm/clip kernels at import: import it before they are patched.
    import raytune_llama.engine.parallel.optim  # noqa: F401
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn: {loss_fn!r} is not callable; pass a function (logits, labels) -> "
                        f"(summed loss, number of targets), or None for next-token cross-entropy")
    for name, value in (("global_batch_size", global_batch_size), ("seq_len", seq_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: {value!r} must be a whole number >= 1 (the DataLoader's rows per step / "
                             f"tokens per row), or None")
    _state["options"] = {"plan": plan, "mixed_precision": mixed_precision, "master_weights": master_weights,
                         "loss_fn": loss_fn, "global_batch_size": global_batch_size, "seq_len": seq_len}
    if _state["enabled"]:
        return
    _state["originals"] = {
        # None when the class inherits it (then restoring means deleting the override)
        "from_pretrained": AutoModelForCausalLM.__dict__.get("from_pretrained"),
        "adamw_step": torch.optim.AdamW.step,
        "tensor_cuda": torch.Tensor.cuda,
        "get_total_norm": clip_grad_module._get_total_norm,
        "clip_with_norm": clip_grad_module._clip_grads_with_norm_,
        "clip_grad_norm": clip_grad_module.clip_grad_norm_,
        "clip_grad_value": clip_grad_module.clip_grad_value_,
    }
    AutoModelForCausalLM.from_pretrained = classmethod(_from_pretrained)
    torch.optim.AdamW.step = _adamw_step
    clip_grad_module._get_total_norm = _global_total_norm
    clip_grad_module._clip_grads_with_norm_ = _clip_with_norm
    torch.nn.utils.clip_grad_norm_ = clip_grad_module.clip_grad_norm_ = _clip_grad_norm
    torch.nn.utils.clip_grad_value_ = clip_grad_module.clip_grad_value_ = _clip_grad_value
    _state["step_hook"] = register_optimizer_step_pre_hook(_refuse_other_optimizers_on_deepspeed)
    if not torch.cuda.is_available():
        torch.Tensor.cuda = _tensor_cuda
    _state["enabled"] = True


def disable_advanced_parallelization() -> None:
    """Undo the patches (tests, or a process that goes on to do something else)."""
    from transformers import AutoModelForCausalLM

    if not _state["enabled"]:
        return
    originals = _state["originals"]
    _restore_from_pretrained(AutoModelForCausalLM)
    torch.optim.AdamW.step = originals["adamw_step"]
    torch.Tensor.cuda = originals["tensor_cuda"]
    clip_grad_module._get_total_norm = originals["get_total_norm"]
    clip_grad_module._clip_grads_with_norm_ = originals["clip_with_norm"]
    torch.nn.utils.clip_grad_norm_ = clip_grad_module.clip_grad_norm_ = originals["clip_grad_norm"]
    torch.nn.utils.clip_grad_value_ = clip_grad_module.clip_grad_value_ = originals["clip_grad_value"]
    _state.pop("step_hook").remove()
    for proxy in _state["proxies"]:
        proxy.engine.close()
    _state.update(enabled=False, proxies=[])


def active_engine():
    """The ParallelEngine of the most recently loaded model (None before from_pretrained)."""
    return _state["proxies"][-1].engine if _state["proxies"] else None
