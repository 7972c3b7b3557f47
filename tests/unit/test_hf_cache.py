"""Hub ids resolve through a local HF cache laid out as `hf download` leaves it, offline; a
model that is not there is one clear error (id, HF_HOME, download command) from validate(),
before any Ray or worker start; the planner reads the snapshot's config.json."""
from __future__ import annotations

import pytest

from raytune_llama.config import ConfigError, load_config
from raytune_llama.engine.hf_cache import ModelNotFoundError, resolve_pretrained
from raytune_llama.presets import preset_config
from tests.hf_cache_layout import REVISION, write_hub_model

HUB_ID = "meta-llama/Meta-Llama-3-70B"
REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf")
    write_hub_model(home, HUB_ID, preset_config("tiny-llama"))
    return home


@pytest.fixture
def offline(hf_home, monkeypatch):
    # Set after huggingface_hub was imported: resolution must read the environment at call time.
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def test_hub_id_resolves_to_its_snapshot_offline(offline):
    path = resolve_pretrained(HUB_ID)
    assert path.name == REVISION and path.parent.name == "snapshots"
    assert (path / "config.json").is_file() and (path / "model.safetensors.index.json").is_file()
    assert (path / "config.json").is_symlink()  # the blobs + symlinks layout of a real cache


def _tree_listing(hf_home, files: list[str]) -> None:
    """The per-commit file list `hf download` keeps next to a snapshot (the repository's whole
    tree, also files the download was told to skip)."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    repo = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    write_tree_cache(str(repo), REVISION, {f: TreeCacheEntry(size=1, blob_id="0" * 40) for f in files})


def test_skipped_original_checkpoint_is_fine_a_missing_shard_is_not(offline):
    from huggingface_hub._tree_cache import _IN_MEMORY_TREE_CACHE

    snapshot = resolve_pretrained(HUB_ID)
    present = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    try:
        # `hf download ... --exclude 'original/*'` (the 141 GB .pth copy of Llama 3 70B).
        _tree_listing(offline, present + ["original/consolidated.00.pth", "original/params.json"])
        _IN_MEMORY_TREE_CACHE.clear()
        assert resolve_pretrained(HUB_ID) == snapshot
        # An interrupted download: a weight shard the listing names is not there.
        _tree_listing(offline, present + ["model-00009-of-00009.safetensors"])
        _IN_MEMORY_TREE_CACHE.clear()
        with pytest.raises(ModelNotFoundError) as err:
            resolve_pretrained(HUB_ID)
        assert "incomplete" in str(err.value) and "model-00009-of-00009.safetensors" in str(err.value)
        assert f"hf download {HUB_ID}" in str(err.value)
    finally:
        (offline / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "trees" / f"{REVISION}.json").unlink()
        _IN_MEMORY_TREE_CACHE.clear()


def test_missing_hub_id_names_id_hf_home_and_download_command(offline):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_pretrained("meta-llama/Meta-Llama-3-8B")
    text = str(err.value)
    assert "model.name_or_path" in text and "'meta-llama/Meta-Llama-3-8B'" in text
    assert f"HF_HOME={offline}" in text and "hf download meta-llama/Meta-Llama-3-8B" in text


def _cfg(tmp_path, model):
    return load_config(REPO / "examples" / "configs" / "llama3_70b_mi250.yaml", [
        f"model.name_or_path={model}", f"data.path={REPO}/examples/data/tiny_corpus.jsonl", "data.format=auto",
        f"run.storage_path={tmp_path}/runs",
    ])


def test_validate_reports_a_model_missing_from_the_cache(offline, tmp_path):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, "meta-llama/Meta-Llama-3-8B").validate()
    assert any("hf download meta-llama/Meta-Llama-3-8B" in p for p in err.value.problems)
    _cfg(tmp_path, HUB_ID).validate()  # the cached one is fine


def test_planner_reads_the_resolved_snapshot(offline, tmp_path):
    from raytune_llama.engine.model_io import ensure_model
    from raytune_llama.trainer.planning import make_run_plan

    cfg = _cfg(tmp_path, HUB_ID)
    path = ensure_model(cfg.model.name_or_path, cfg.model.random_init)
    assert path == str(resolve_pretrained(HUB_ID))
    run = make_run_plan(cfg, path)  # was FileNotFoundError: 'meta-llama/Meta-Llama-3-70B/config.json'
    assert run.plan.world_size == cfg.parallel.num_workers
