"""Hub ids -> local model folders. A `model.name_or_path` such as `meta-llama/Meta-Llama-3-70B`
is looked up in the Hugging Face cache (`$HF_HOME/hub/models--meta-llama--Meta-Llama-3-70B/
snapshots/<revision>/`, the revision `refs/main` points at) with huggingface_hub, never
downloaded: a 70B checkpoint is ~141 GB and is fetched once, on purpose, onto storage every
node sees. The snapshot folder is what the planner, every worker and the export then read.

    path = resolve_pretrained("meta-llama/Meta-Llama-3-70B")   # Path to the snapshot folder

Needs no torch; safe to call on the driver before Ray starts (see docs/parallel_engine.md,
"Where the weights come from")."""
from __future__ import annotations

import os
from pathlib import Path


class ModelNotFoundError(ValueError):
    """A model or tokenizer that is neither a local folder nor in the local HF cache."""


def looks_like_hub_id(name: str) -> bool:
    """True for 'org/model' style names that are not existing local paths."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def hf_home() -> str:
    """The HF cache root as the environment says now (HF_HOME, default ~/.cache/huggingface)."""
    from huggingface_hub import constants

    return os.path.expanduser(os.environ.get("HF_HOME") or constants.HF_HOME)


def hub_cache_dir() -> str:
    """Where hub models are cached: HF_HUB_CACHE (or its older name HUGGINGFACE_HUB_CACHE), else
    HF_HOME/hub. Read at call time (not at huggingface_hub's import), so a process that sets
    HF_HOME late still finds its cache."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return os.path.expanduser(os.path.expandvars(explicit or os.path.join(hf_home(), "hub")))


# What training reads from a model repository. Llama releases also carry the original
# checkpoint (`original/*.pth`, as large as the safetensors): it is neither needed nor
# required to be in the cache.
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "tokenizer*", "special_tokens_map.json", "*.model", "*.tiktoken"]


def _download_hint(name: str) -> str:
    home = os.environ.get("HF_HOME")
    prefix = f"HF_HOME={home} " if home else ""
    return (f"download it once where the cluster's nodes can read it: `{prefix}hf download {name} --exclude "
            f"'original/*'` (gated models need `hf auth login` first), or give a local model folder")


def resolve_pretrained(name_or_path: str, field: str = "model.name_or_path", *, cache_dir: str | None = None,
                       revision: str | None = None) -> Path:
    """The local folder for a local path or a hub id in the HF cache; a hub id not in the
    cache, or whose cached snapshot lacks files training reads, raises ModelNotFoundError
    naming the id, the cache, HF_HOME and the download command."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path.resolve()
    if not looks_like_hub_id(name_or_path):
        raise ModelNotFoundError(f"{field}: {name_or_path!r} does not exist and is not an HF hub id "
                                 f"('org/name'); give a local model folder or a hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    cache = cache_dir or hub_cache_dir()
    where = f"the HF cache at {cache} (HF_HOME={os.environ.get('HF_HOME', 'unset')})"
    try:
        # local_files_only: the cache only, whatever HF_HUB_OFFLINE says (no 141 GB surprise).
        # allow_patterns: only the files training reads must be there, and all of them.
        return Path(snapshot_download(repo_id=name_or_path, revision=revision, local_files_only=True,
                                      cache_dir=cache, allow_patterns=MODEL_FILES)).resolve()
    except IncompleteSnapshotError as exc:
        raise ModelNotFoundError(
            f"{field}: the snapshot of {name_or_path!r} in {where} is incomplete ({exc}); re-run the "
            f"download to finish it: {_download_hint(name_or_path)}") from exc
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as exc:
        raise ModelNotFoundError(
            f"{field}: {name_or_path!r} is not a local folder and is not in {where}; "
            f"{_download_hint(name_or_path)}") from exc
