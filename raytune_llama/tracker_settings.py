"""`run.trackers` of the config, checked without importing any tracker library (the config
checks run on the driver before anything starts; trainer/trackers.py feeds the trackers)."""
from __future__ import annotations

import importlib.util
import json
from typing import Any

# tracker name -> (module it needs, pip package that provides the module)
KNOWN_TRACKERS: dict[str, tuple[str, str]] = {
    "mlflow": ("mlflow", "mlflow-skinny"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}


def tracker_problems(kinds: Any) -> list[str]:
    """Problems with run.trackers, one sentence each naming the field, the value and a fix."""
    if isinstance(kinds, str):
        return [f"run.trackers: expected a list of tracker names, got the string {kinds!r}; "
                f"write it as a list: --set 'run.trackers=[{json.dumps(kinds)}]'"]
    if not isinstance(kinds, (list, tuple)):
        return [f"run.trackers: expected a list of tracker names, got {kinds!r}; use e.g. "
                f"--set 'run.trackers=[\"mlflow\", \"tensorboard\"]' (or [] for none)"]
    names = [name for name in kinds if isinstance(name, str)]
    problems = [_unknown_tracker(name) for name in kinds if not isinstance(name, str)]
    problems += [_unknown_tracker(name) for name in dict.fromkeys(names) if name not in KNOWN_TRACKERS]
    problems += [f"run.trackers: {name!r} is listed {names.count(name)} times; list each tracker once"
                 for name in dict.fromkeys(names) if names.count(name) > 1]
    problems += [_missing_library(name) for name in dict.fromkeys(names)
                 if name in KNOWN_TRACKERS and not _library_installed(name)]
    return problems


def _unknown_tracker(name: Any) -> str:
    hint = f" (did you mean {name.lower()!r}?)" if isinstance(name, str) and name.lower() in KNOWN_TRACKERS else ""
    return (f"run.trackers: unknown tracker {name!r}{hint}; known trackers are "
            f"{', '.join(KNOWN_TRACKERS)}")


def _library_installed(name: str) -> bool:
    module, _ = KNOWN_TRACKERS[name]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _missing_library(name: str) -> str:
    module, package = KNOWN_TRACKERS[name]
    return f"run.trackers: {name!r} needs the {module} package: pip install {package}"
