"""The torch releases raytune_llama runs on, declared once. MIN_TORCH is the newest of the first
releases that have each torch API the engine calls, in the form it calls it (table in
cluster/README.md, "Which torch the images carry"): torch 2.10 is the first with FSDP2's
`replicate` over a 1-D data-parallel mesh and with `return_outputs=` on the pipeline schedules'
`step`. pyproject.toml's torch range, the images in cluster/ and tests/unit/test_versions.py
agree with these constants. Importing this module imports no torch (check_torch_version reads
the installed version from the package metadata first), so the CLI checks before any Ray work;
the planner never imports it (it needs no torch at all, docs/planner.md)."""
from __future__ import annotations

import importlib.metadata
import re
import sys

MIN_TORCH = "2.10"
"""Oldest torch release the engine runs on (pyproject.toml: torch>=MIN_TORCH)."""

TORCH_BELOW = "2.15"
"""First torch release not yet supported (pyproject.toml: torch<TORCH_BELOW)."""

ROCM_IMAGE = "rocm/pytorch:rocm7.2.4_ubuntu24.04_py3.12_pytorch_release_2.10.0"
"""The ROCm PyTorch image of cluster/mi250.yaml and the base of cluster/Dockerfile.rocm."""

_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?")


class TorchVersionError(ImportError):
    """The installed torch is missing, unreadable or older than MIN_TORCH."""


def parse_torch_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a torch version string such as '2.13.0+cpu' or '2.8.0+rocm6.4'."""
    # Local suffixes (+cpu, +cu128, +rocm6.4, +git...) and pre-release tags are ignored: ROCm and
    # vendor builds of a release branch call themselves e.g. 2.10.0a0+git449b176 and carry that
    # release's APIs.
    match = _VERSION.match(str(text))
    if match is None:
        raise ValueError(
            f"torch version {text!r} is not MAJOR.MINOR[.PATCH] (optionally followed by a suffix "
            f"such as '+cpu', 'a0+git...' or '+rocm6.4'); pass the string torch.__version__ reports"
        )
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def installed_torch_version() -> str | None:
    """The installed torch's version string, or None when torch is not installed."""
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__version__", None):
        return str(torch.__version__)
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # a source build without package metadata
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def _fix() -> str:
    return (
        f"on the MI250 cluster use the image {ROCM_IMAGE} (cluster/mi250.yaml, cluster/Dockerfile.rocm, "
        f"cluster/README.md); elsewhere pip install 'torch>={MIN_TORCH},<{TORCH_BELOW}' (for a ROCm or "
        f"CUDA build add --index-url https://download.pytorch.org/whl/<rocmX.Y|cuXYZ|cpu>)"
    )


def check_torch_version(installed: str | None = None) -> str:
    """Raise TorchVersionError unless torch >= MIN_TORCH is installed; returns its version string."""
    version = installed if installed is not None else installed_torch_version()
    if version is None:
        raise TorchVersionError(f"torch is not installed; raytune_llama needs torch >= {MIN_TORCH}. Fix: {_fix()}")
    try:
        found = parse_torch_version(version)
    except ValueError as exc:
        raise TorchVersionError(f"cannot read the installed torch version: {exc}. Fix: {_fix()}") from None
    if found < parse_torch_version(MIN_TORCH):
        raise TorchVersionError(
            f"the installed torch is {version}, but raytune_llama needs torch >= {MIN_TORCH} "
            f"(< {TORCH_BELOW}): the engine calls torch APIs first released in {MIN_TORCH} "
            f"(cluster/README.md lists them). Fix: {_fix()}"
        )
    return version
