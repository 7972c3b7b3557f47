"""Named model configurations (HF config fields) from the planner's built-in registry,
used to create a model with random weights (`model.random_init`) with no download."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

REGISTRY_DIR = Path(__file__).parent / "planner" / "registry"


@lru_cache(maxsize=None)
def known_presets() -> list[str]:
    """Names of the built-in model configurations."""
    return sorted(p.stem for p in REGISTRY_DIR.glob("*.json"))


def preset_hf_config(name: str) -> dict:
    """The HF config dict (model_type, hidden_size, ...) of a built-in preset."""
    if name not in known_presets():
        raise ValueError(f"unknown model preset {name!r}; known presets are {known_presets()}")
    data = json.loads((REGISTRY_DIR / f"{name}.json").read_text())
    return dict(data.get("hf_config", data))


def preset_config(name: str):
    """A transformers config of the preset, without a declared dtype or architectures (weights
    are created in fp32; the dtype to train in is chosen at load time)."""
    from transformers import AutoConfig

    hf = {k: v for k, v in preset_hf_config(name).items() if not k.startswith("_")}
    for key in ("torch_dtype", "dtype", "architectures"):
        hf.pop(key, None)
    return AutoConfig.for_model(hf.pop("model_type"), **hf)
