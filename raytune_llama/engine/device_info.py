"""Which planner hardware profile a torch device is, and the FLOP figures for MFU."""
from __future__ import annotations

from typing import Optional

import torch

from raytune_llama.planner.hardware import load_hardware

# (substring of the lower-cased device name, profile); the first match wins.
_NAME_TO_PROFILE = (("mi300x", "mi300x"), ("h200", "h200"), ("h100", "h100"), ("a100", "a100-80gb"))
# MI250 and MI250X GCDs report the same name ("AMD Instinct MI250X / MI250"); their compute
# unit counts differ (110 vs 104 per GCD).
_MI250X_CUS = 110


def hardware_profile_name(device: torch.device) -> Optional[str]:
    """Planner profile for a device ('cpu', 'h100', 'mi250', ...), None when unknown."""
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    if "mi250" in name:
        cus = torch.cuda.get_device_properties(device).multi_processor_count
        return "mi250x" if cus >= _MI250X_CUS else "mi250"
    return next((prof for key, prof in _NAME_TO_PROFILE if key in name), None)


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one device from its profile (None when unknown)."""
    name = hardware_profile_name(device)
    return load_hardware(name).peak_flops if name else None


def peak_memory_bytes(device: torch.device) -> Optional[int]:
    """Peak memory of this rank since its process started: the accelerator allocator's peak, or
    on CPU the process's peak resident set (which also holds the interpreter and libraries:
    an upper bound of what the model used)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "cpu":
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return int(peak if sys.platform == "darwin" else peak * 1024)
    return None


def mfu(tokens_per_s: float, flops_per_token: Optional[float], peak: Optional[float], devices: int) -> Optional[float]:
    """Model FLOPs utilisation (model FLOPs as in the planner), None when a figure is unknown."""
    if not flops_per_token or not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * devices)
