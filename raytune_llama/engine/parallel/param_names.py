"""Parameter names: the engine's module names -> the names in an HF checkpoint (wrapper
prefixes and peft's `.base_layer` level removed), shared by loading, state and LoRA."""
from __future__ import annotations

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")
"""What activation checkpointing, torch.compile and DDP put in front of a name."""


def clean_fqn(name: str) -> str:
    """Parameter name without wrapper prefixes (checkpoint_wrapper, compile, DDP)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def hf_name(name: str) -> str:
    """Engine name -> the base checkpoint's name: peft's `.base_layer` level removed."""
    return name.replace(".base_layer.", ".")
