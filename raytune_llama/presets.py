"""Named model configurations (HF config fields) from the planner's built-in registry
(planner/model_spec.py), used to create a model with random weights (`model.random_init`) with
no download."""
from __future__ import annotations

from raytune_llama.planner.model_spec import registry_entry, registry_names


def known_presets() -> list[str]:
    """Names of the built-in model configurations."""
    return registry_names()


def preset_hf_config(name: str) -> dict:
    """The HF config dict (model_type, hidden_size, ...) of a built-in preset."""
    if name not in known_presets():
        raise ValueError(f"unknown model preset {name!r}; known presets are {known_presets()}")
    data = registry_entry(name)
    return dict(data.get("hf_config", data))


def preset_config(name: str):
    """A transformers config of the preset, without a declared dtype or architectures (weights
    are created in fp32; the dtype to train in is chosen at load time)."""
    from transformers import AutoConfig

    hf = {k: v for k, v in preset_hf_config(name).items() if not k.startswith("_")}
    for key in ("torch_dtype", "dtype", "architectures"):
        hf.pop(key, None)
    return AutoConfig.for_model(hf.pop("model_type"), **hf)
