"""The run configuration the integration tests share: the tiny random Llama on the shipped
corpus, 64-token rows, a global batch of 8, a 2-step warm-up; each test adds its own overrides."""
from raytune_llama.config import load_config
from tests.integration.conftest import REPO


def tiny_run_config(tmp, name: str, steps: int, *extra: str):
    """Config for run `name` under tmp (model in tmp/models, runs in tmp/runs)."""
    return load_config(REPO / "examples" / "configs" / "tiny_cpu.yaml", [
        f"model.name_or_path={tmp}/models/tiny-llama", f"data.path={REPO}/examples/data/tiny_corpus.jsonl",
        f"run.storage_path={tmp}/runs", f"run.name={name}", f"train.max_steps={steps}",
        "train.global_batch_size=8", "data.seq_len=64", "train.warmup_steps=2", *extra,
    ])


def seeded_order_ids(store_path, steps, global_batch: int, data=None) -> list[str]:
    """The document ids (those starting in each row) that the run's seeded order puts in the
    global batches of `steps` (0-based), read from the run's token store."""
    from raytune_llama.config import DataConfig
    from raytune_llama.engine.data.order import SampleOrder
    from raytune_llama.engine.data.store import TokenStore

    store = TokenStore(store_path)
    order = SampleOrder.for_data(store, data or DataConfig(), global_batch)
    rows = [p for s in steps for p in order.positions(s * global_batch)]
    return [i for cell in store.read(rows, with_ids=True)["doc_ids"] for i in cell.split(",") if i]
