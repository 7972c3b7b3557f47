"""LoRA adapters (peft) on the engine's stage modules (docs/lora.md).

    settings = LoraSettings.from_dict(cfg.train.lora)          # raytune_llama/lora_settings.py
    check_plan(plan, config, settings)                         # refusals (plan_check.py), before anything is built
    init = initial_adapters(model, settings, torch.float32)    # whole-model adapter init, every rank alike
    inject_adapters(stage, settings, base_dtype, adapter_dtype)  # peft layers on one stage (meta adapters)

The adapters are peft's own `LoraLayer`s, injected with `peft.inject_adapter_in_model` into each
pipeline stage this rank holds, before tensor / data parallel shard anything. They are created
on the meta device and filled like the base weights: each rank copies its own slice of the
whole-model initial values (`initial_adapters`), which peft itself computes on a weightless
skeleton of the model from global rank 0's torch RNG state, so every rank and every layout
starts from the adapters single-process `peft.get_peft_model` makes from that state (lora_A
kaiming-uniform, lora_B zero: the first step's loss is the base model's).

Names: the engine keeps peft's module names, so a targeted linear's base weight is
`<module>.base_layer.weight` (the checkpoint's `<module>.weight`: `hf_name`) and its adapter
`<module>.lora_A.default.weight`; peft's saved-adapter format drops the adapter name and
prefixes `base_model.model.` (`peft_key`).
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from raytune_llama.lora_settings import LoraSettings
from .param_names import clean_fqn

log = logging.getLogger(__name__)

ADAPTER = "default"
"""peft's adapter name inside the engine's modules."""
_ADAPTER_PARAM = re.compile(rf"\.lora_(A|B)\.{ADAPTER}\.")
PEFT_PREFIX = "base_model.model."


def lora_settings(lora) -> LoraSettings | None:
    """LoraSettings from a `train.lora` mapping, LoraSettings or None."""
    if lora is None or isinstance(lora, LoraSettings):
        return lora
    return LoraSettings.from_dict(lora)


def peft_config(lora: LoraSettings, base_model: str | None = None):
    """The peft LoraConfig of these settings (also what the adapter export writes)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model)


def is_adapter(name: str) -> bool:
    """True for an adapter parameter name (lora_A / lora_B)."""
    return _ADAPTER_PARAM.search(name) is not None


def is_lora_layer(module: nn.Module) -> bool:
    """True for a peft LoRA layer (without importing peft: no module is one before peft is loaded)."""
    import sys

    peft_lora = sys.modules.get("peft.tuners.lora")
    return peft_lora is not None and isinstance(module, peft_lora.LoraLayer)


def peft_key(name: str) -> str:
    """Engine adapter name -> peft's saved-adapter key
    (`model.layers.0.self_attn.q_proj.lora_A.default.weight` ->
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    return PEFT_PREFIX + name.replace(f".{ADAPTER}.", ".")


def base_dtype(adapter_dtype: torch.dtype, mixed_precision: str | None) -> torch.dtype:
    """The frozen base's dtype: the compute dtype (bf16 under mixed_precision "bf16"), else
    the adapters' (master) dtype."""
    return torch.bfloat16 if mixed_precision == "bf16" else adapter_dtype


def _skeleton(model: nn.Module, targets: set[str]) -> nn.Module:
    """The model's targeted linears under their names, in the model's module order, each with
    a weight that is a zero-stride CPU tensor (no memory): all peft needs to create and
    initialise the adapters exactly as on the real model."""
    root = nn.Module()
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(torch.zeros((), dtype=torch.float32).expand(module.out_features,
                                                                                  module.in_features),
                                     requires_grad=False)
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, linear)
    return root


def _rank0_rng_state() -> torch.Tensor:
    import torch.distributed as dist

    state = torch.get_rng_state()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    return state


def initial_adapters(model: nn.Module, lora: LoraSettings, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Whole-model initial adapter weights (engine names -> CPU tensors in `dtype`), the same on
    every rank: peft initialises them on a weightless skeleton from global rank 0's torch CPU RNG
    state (collective when distributed), inside fork_rng so no rank's own RNG moves. Memory: the
    adapters once (Llama 3 70B, r=16, all seven projections: 207M values, 0.8 GB in fp32)."""
    from peft import inject_adapter_in_model

    skeleton = _skeleton(model, set(lora.target_modules))
    if not any(True for _ in skeleton.modules() if isinstance(_, nn.Linear)):
        raise ValueError(f"train.lora.target_modules: {list(lora.target_modules)} match no linear layer of the model")
    state = _rank0_rng_state()
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        inject_adapter_in_model(peft_config(lora), skeleton)
    return {name: p.detach().to(dtype) for name, p in skeleton.named_parameters() if is_adapter(name)}


def inject_adapters(stage: nn.Module, lora: LoraSettings, base: torch.dtype, adapter: torch.dtype) -> None:
    """peft LoRA layers on `stage`'s targeted linears, in place: the base (every parameter that
    is not an adapter) frozen and in `base` dtype, the adapters on the meta device in `adapter`
    dtype (filled later by `fill_adapters` or the sharded load)."""
    from peft import inject_adapter_in_model

    _cast_params(stage, base)
    inject_adapter_in_model(peft_config(lora), stage, low_cpu_mem_usage=True)  # adapters on meta
    wrapped = [m for m in stage.modules() if is_lora_layer(m)]
    for module in wrapped:
        module.lora_A[ADAPTER].to(adapter)
        module.lora_B[ADAPTER].to(adapter)
    freeze_base(stage)
    log.info("lora: r=%d alpha=%g dropout=%g on %d linears (%s), base %s, adapters %s", lora.r, lora.alpha,
             lora.dropout, len(wrapped), ",".join(lora.target_modules), base, adapter)


def freeze_base(stage: nn.Module) -> None:
    """Only the adapters train. Called after injection and again after tensor parallel, whose
    styles make new parameters (SequenceParallel's replicated norms require grad)."""
    for name, p in stage.named_parameters():
        p.requires_grad_(is_adapter(name))


def _cast_params(stage: nn.Module, dtype: torch.dtype) -> None:
    """Parameters (not buffers: the rotary frequencies stay fp32) to `dtype`, ties kept."""
    done: dict[int, nn.Parameter] = {}
    for module in stage.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in done:
                done[id(p)] = p if p.dtype == dtype else nn.Parameter(p.detach().to(dtype),
                                                                      requires_grad=p.requires_grad)
            setattr(module, name, done[id(p)])


@torch.no_grad()
def fill_adapters(stage: nn.Module, init: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give a stage whose base is real (not meta) its initial adapters on `device` (before
    tensor / data parallel, which then shard them like any other parameter)."""
    for name, module in list(stage.named_modules()):
        if isinstance(module, nn.Linear) and module.weight.is_meta and is_adapter(clean_fqn(name) + ".weight"):
            value = init[clean_fqn(name) + ".weight"]
            module.weight = nn.Parameter(value.to(device, module.weight.dtype), requires_grad=True)
