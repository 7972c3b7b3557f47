"""Document packing: a packed row's loss is the token-weighted loss of its documents run one at a
time, on every layout family (FSDP, TP + sequence parallel, pipeline, DeepSpeed).

Rows are packed by the store's own packer (engine/packing.py DocumentPacker: whole documents,
position ids restarting at 0, first token of each document not a target). The reference runs
every document ALONE through the plain HF model (no packing, no mask), sums its token losses,
and takes one AdamW step on sum / count over the global batch: the same update one process
would make on the documents one by one. Two steps, so the gradients are compared too (step 2's
loss depends on step 1's update). A control runs the same rows without position ids (attention
across documents) and must differ: the mask is what makes the difference.
"""
from __future__ import annotations

import datetime
import os
import tempfile

import numpy as np
import pytest
import torch

import harness

pytestmark = pytest.mark.numerics

EOS, PAD = 2, 0
SEQ = 32
STEPS = 2

LAYOUTS = {
    "fsdp2_zero3": dict(dp_shard=2, zero_stage=3, micro_batch_size=2, grad_accum=2),
    "tp2_sp": dict(tp=2, sequence_parallel=True, micro_batch_size=4, grad_accum=2),
    "pp2_1f1b": dict(pp=2, pp_schedule="1f1b", micro_batch_size=2, grad_accum=4),
    "deepspeed_zero2": dict(dp_shard=2, zero_stage=2, backend="deepspeed", micro_batch_size=2, grad_accum=2),
}


def _documents(step: int) -> list[list[int]]:
    """Documents of 3..20 tokens (plus EOS <= 21 < SEQ), as many as GLOBAL_ROWS rows hold."""
    from raytune_llama.engine.packing import pack_token_lists

    rng = np.random.default_rng(100 + step)
    docs: list[list[int]] = []
    while True:
        doc = [int(t) for t in rng.integers(3, 512, int(rng.integers(3, 21)))]
        if len(pack_token_lists(docs + [doc], SEQ, EOS, PAD, mode="documents")["input_ids"]) > harness.GLOBAL_ROWS:
            return docs
        docs.append(doc)


def packed_batches() -> list[tuple[dict, list[list[int]]]]:
    """(global batch of GLOBAL_ROWS packed rows, the documents in it) per step."""
    from raytune_llama.engine.packing import pack_token_lists

    out = []
    for step in range(STEPS):
        docs = _documents(step)
        packed = pack_token_lists(docs, SEQ, EOS, PAD, mode="documents")
        rows = packed["input_ids"].shape[0]
        assert rows <= harness.GLOBAL_ROWS, rows
        fill = harness.GLOBAL_ROWS - rows  # whole padding rows: no targets
        ids = np.concatenate([packed["input_ids"], np.full((fill, SEQ), PAD)])
        labels = np.concatenate([packed["labels"], np.full((fill, SEQ), harness.IGNORE_INDEX)])
        positions = np.concatenate([packed["position_ids"], np.tile(np.arange(SEQ), (fill, 1))])
        batch = {"input_ids": torch.from_numpy(ids).long(), "labels": torch.from_numpy(labels).long(),
                 "position_ids": torch.from_numpy(positions).long()}
        kept = [d for d in docs]  # every document is in the batch (the packer drops nothing)
        out.append((batch, kept))
    return out


def reference_losses() -> list[float]:
    """One process, each document alone: loss = sum of every document's token CE / count."""
    from raytune_llama.engine.parallel.optim import adamw_param_groups

    torch.set_num_threads(1)
    net = harness.tiny_model()
    hp = harness.HP
    opt = torch.optim.AdamW(adamw_param_groups(net.named_parameters(), hp["weight_decay"]), lr=hp["lr"],
                            betas=hp["betas"])
    losses = []
    for _, docs in packed_batches():
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        count = sum(len(d) for d in docs)  # doc + EOS, minus the first token: len(d) targets each
        for d in docs:
            ids = torch.tensor([d + [EOS]])
            logits = net(input_ids=ids).logits[0, :-1]
            total = total + torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum")
        loss = total / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), hp["max_grad_norm"])
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _worker(rank, world, port, model_dir, out_prefix):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch.distributed as dist

    from raytune_llama.engine.model_io import build_engine
    from raytune_llama.planner.plan import ParallelPlan

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    results = {}
    try:
        batches = [b for b, _ in packed_batches()]
        for name, plan in list(LAYOUTS.items()) + [("control_fsdp2_no_positions", LAYOUTS["fsdp2_zero3"])]:
            engine = build_engine(model_dir, ParallelPlan(**plan), device_type="cpu", mixed_precision=None,
                                  **harness.HP)
            per = harness.GLOBAL_ROWS // engine.dp_size
            lo, hi = engine.dp_rank * per, (engine.dp_rank + 1) * per
            losses = []
            for b in batches:
                mine = {k: v[lo:hi] for k, v in b.items()}
                if name.startswith("control"):
                    mine.pop("position_ids")
                losses.append(engine.train_step(mine)["loss"])
            engine.close()
            results[name] = losses
    except Exception:
        import traceback

        results = {"error": f"rank {rank}: " + traceback.format_exc()}
    harness.finish_rank(results, out_prefix, rank)


@pytest.fixture(scope="module")
def measured():
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".cache", "torch_extensions"))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        harness.tiny_model().save_pretrained(model_dir, safe_serialization=True)
        per_rank = harness.spawn_ranks(_worker, 2, tmp, model_dir)
    return per_rank[0], reference_losses()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_packed_rows_equal_documents_run_alone(measured, name):
    results, reference = measured
    print(f"{name}: {results[name]} vs documents alone {reference}")
    np.testing.assert_allclose(results[name], reference, rtol=1e-5)


def test_without_the_mask_attention_crosses_documents(measured):
    """The control: the same rows, position ids dropped, attend across documents: another loss."""
    results, reference = measured
    assert abs(results["control_fsdp2_no_positions"][0] - reference[0]) > 1e-3
