"""A one-line loop (engine/one_line.py) on 2 gloo ranks against the same loop in one process,
for pipeline, DeepSpeed, TP and FSDP layouts:
* `clip_grad_norm_(model.parameters(), 1.0)` returns the global pre-clip norm and clips by it:
  under pipeline parallel the stage norms are combined (the loop imports `clip_grad_norm_` by
  name, which only works because torch's `_get_total_norm` is what is patched); under DeepSpeed
  the clipping is handed to its step and the returned tensor receives the norm at `optim.step()`;
* evaluation under `torch.no_grad()` / `model.eval()`: the global token-mean loss of a held-out
  batch equals the single-process model's, with no gradient created;
* the HF model methods scripts call: `save_pretrained` (collective, streamed; plain transformers
  loads weights equal to the single-process loop's), `num_parameters`, `get_input_embeddings`,
  `generation_config`, `gradient_checkpointing_enable`, and a helpful AttributeError otherwise.
Run: TORCH_EXTENSIONS_DIR=.cache/torch_extensions .venv/bin/python -m pytest tests/numerics/test_one_line_loop.py -q -s
"""
from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import pytest
import torch
from torch.nn.utils import clip_grad_norm_  # bound before the one line patches anything

import harness

pytestmark = pytest.mark.numerics
WORLD, STEPS, LR, MAX_NORM = 2, 4, 3e-3, 1.0
LAYOUTS = {
    "pp": dict(pp=2, pp_schedule="1f1b", micro_batch_size=4, grad_accum=2),
    "deepspeed": dict(dp_shard=2, zero_stage=2, backend="deepspeed", micro_batch_size=4),
    "tp": dict(tp=2, micro_batch_size=4, grad_accum=2),
    "fsdp": dict(dp_shard=2, zero_stage=3, micro_batch_size=2, grad_accum=2),
}
EVAL_BATCH = harness.global_batches(STEPS + 1)[-1]  # rows the loop never trained on


def _loop(model, rows: slice, by_attribute: bool) -> dict:
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for batch in harness.global_batches(STEPS):
        out = model(input_ids=batch["input_ids"][rows], labels=batch["labels"][rows])
        out.loss.backward()
        clip = torch.nn.utils.clip_grad_norm_ if by_attribute else clip_grad_norm_
        norm = clip(model.parameters(), MAX_NORM)
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        norms.append(float(norm))  # read after the step (DeepSpeed fills it there)
    return {"losses": losses, "norms": norms}


def _is_1d(name: str) -> bool:
    return "norm" in name or name.endswith("bias")


def _groups_loop(model, rows: slice) -> dict:
    """Two param groups as HF scripts write them, over named_parameters(): weight decay on the
    matrices, none and half the lr on norms and biases."""
    named = list(model.named_parameters())
    optim = torch.optim.AdamW([{"params": [p for n, p in named if not _is_1d(n)], "weight_decay": 0.1},
                               {"params": [p for n, p in named if _is_1d(n)], "weight_decay": 0.0, "lr": LR / 2}],
                              lr=LR)
    losses = []
    for batch in harness.global_batches(STEPS)[:2]:
        out = model(input_ids=batch["input_ids"][rows], labels=batch["labels"][rows])
        out.loss.backward()
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    return {"losses": losses, "names": sorted(n for n, _ in named)}


def _refused_grouping(model, rows: slice) -> str:
    """DeepSpeed: a grouping that splits the matrices with different settings is refused."""
    named = list(model.named_parameters())
    optim = torch.optim.AdamW([{"params": [p for n, p in named if "embed" in n], "lr": LR / 10},
                               {"params": [p for n, p in named if "embed" not in n]}], lr=LR)
    batch = harness.global_batches(1)[0]
    model(input_ids=batch["input_ids"][rows], labels=batch["labels"][rows]).loss.backward()
    try:
        optim.step()
    except ValueError as exc:
        return str(exc)
    finally:
        model.zero_grad(set_to_none=True)
    return "not refused"


def _refused_optimizer(model) -> str:
    """DeepSpeed steps its own AdamW: SGD over the model is refused before it changes anything."""
    try:
        torch.optim.SGD(model.parameters(), lr=LR).step()
    except ValueError as exc:
        message = str(exc)
    else:
        message = "not refused"
    try:
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.1)
    except ValueError as exc:
        return message + " | " + str(exc)
    return message + " | clip_grad_value_ not refused"


def second_half_loss(logits, labels):
    """A custom loss: next-token cross-entropy over the second half of each sequence only,
    summed, and its target count (which the engine cannot know from the labels)."""
    targets = labels[:, 1:].clone()
    targets[:, : targets.shape[1] // 2] = -100
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                           ignore_index=-100, reduction="sum")
    return ce, (targets != -100).sum()


def _custom_loss_loop(model, rows: slice) -> dict:
    """Two steps and an eval pass with the model built under enable_advanced_parallelization(loss_fn=...).
    Training passes the whole global batch on every rank, as a loop over its own DataLoader
    does: the model takes its dp rank's rows. A batch of another size is refused first."""
    try:
        model(input_ids=harness.global_batches(1)[0]["input_ids"][:3], labels=harness.global_batches(1)[0]["labels"][:3])
        wrong = "not refused"
    except ValueError as exc:
        wrong = str(exc)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for batch in harness.global_batches(STEPS)[:2]:
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        out.loss.backward()
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    with torch.no_grad():
        evaluated = float(model(input_ids=EVAL_BATCH["input_ids"][rows], labels=EVAL_BATCH["labels"][rows]).loss)
    return {"losses": losses, "eval": evaluated, "wrong_batch": wrong}


def _evaluate(model, rows: slice) -> dict:
    """An eval pass as scripts write it: no_grad, and model.eval() / model.train() around it."""
    with torch.no_grad():
        first = float(model(input_ids=EVAL_BATCH["input_ids"][rows], labels=EVAL_BATCH["labels"][rows]).loss)
    model.eval()
    second = float(model(input_ids=EVAL_BATCH["input_ids"][rows], labels=EVAL_BATCH["labels"][rows]).loss)
    model.train()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    with torch.no_grad():  # no labels: logits, as HF returns them
        try:
            logits = model(input_ids=EVAL_BATCH["input_ids"][rows]).logits
            got = {"head": logits[..., :8].tolist(), "row_sums": logits.sum(-1).tolist(), "vocab": logits.shape[-1]}
        except ValueError as exc:
            got = {"refused": str(exc)}
    return {"no_grad": first, "eval_mode": second, "grads_after": len(grads), "logits": got}


def _hf_methods(model, export_dir: str) -> dict:
    """The HF model methods a fine-tuning script calls, on the parallelized model."""
    info = {"num_parameters": model.num_parameters(),
            "num_parameters_no_embeddings": model.num_parameters(exclude_embeddings=True),
            "is_gradient_checkpointing": model.is_gradient_checkpointing,
            "generation_config": type(model.generation_config).__name__}
    model.gradient_checkpointing_enable()  # logs; the plan decides recompute
    try:
        info["input_embeddings"] = type(model.get_input_embeddings()).__name__
    except RuntimeError as exc:
        info["input_embeddings"] = str(exc)
    try:
        model.resize_token_embeddings(10)
    except AttributeError as exc:
        info["unknown_attribute"] = str(exc)
    model.save_pretrained(export_dir, max_shard_size="200KB")  # collective; several parts + index
    return info


def _worker(rank: int, world: int, port: int, model_dir: str, out_prefix: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import raytune_llama

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    results = {}
    try:
        for name, plan in LAYOUTS.items():
            raytune_llama.enable_advanced_parallelization(plan)
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            dp_rank, dp_size = model.engine.dp_rank, model.engine.dp_size
            per = harness.GLOBAL_ROWS // dp_size
            results[name] = _loop(model, slice(dp_rank * per, (dp_rank + 1) * per), by_attribute=name == "deepspeed")
            results[name]["eval"] = _evaluate(model, slice(dp_rank * per, (dp_rank + 1) * per))
            results[name]["hf"] = _hf_methods(model, os.path.join(os.path.dirname(model_dir), f"export_{name}"))
            results[name]["groups"] = _groups_loop(model, slice(dp_rank * per, (dp_rank + 1) * per))
            if name == "deepspeed":
                results[name]["refused"] = _refused_grouping(model, slice(dp_rank * per, (dp_rank + 1) * per))
                results[name]["refused_sgd"] = _refused_optimizer(model)
            raytune_llama.disable_advanced_parallelization()
            raytune_llama.enable_advanced_parallelization(plan, loss_fn=second_half_loss)
            try:
                model = AutoModelForCausalLM.from_pretrained(model_dir)
                results[name]["custom_loss"] = _custom_loss_loop(model, slice(dp_rank * per, (dp_rank + 1) * per))
            except ValueError as exc:
                results[name]["custom_loss"] = {"refused": str(exc)}
            raytune_llama.disable_advanced_parallelization()
    except Exception:
        results = {"error": f"rank {rank}: " + traceback.format_exc()}
    harness.finish_rank(results, out_prefix, rank, barrier=False)


@pytest.fixture(scope="module")
def results() -> list[dict]:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".cache", "torch_extensions"))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        harness.tiny_model().save_pretrained(model_dir, safe_serialization=True)
        per_rank = harness.spawn_ranks(_worker, WORLD, tmp, model_dir)
        from transformers import AutoModelForCausalLM

        exports = {}
        for name in LAYOUTS:  # what save_pretrained wrote, loaded back by plain transformers
            folder = os.path.join(tmp, f"export_{name}")
            exports[name] = {"files": sorted(os.listdir(folder)),
                             "state": AutoModelForCausalLM.from_pretrained(folder).state_dict()}
    return {"ranks": per_rank, "exports": exports}


@pytest.fixture(scope="module")
def reference() -> dict:
    torch.set_num_threads(1)
    model = harness.tiny_model()
    trace = _loop(model, slice(None), by_attribute=True)
    with torch.no_grad():
        eval_loss = float(model(input_ids=EVAL_BATCH["input_ids"], labels=EVAL_BATCH["labels"]).loss)
        logits = model(input_ids=EVAL_BATCH["input_ids"]).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}  # what save_pretrained wrote
    groups = _groups_loop(model, slice(None))
    return {**trace, "model": model, "state": state, "eval": eval_loss, "groups": groups, "logits": logits,
            "custom_loss": _reference_custom_loss()}


def _reference_custom_loss() -> dict:
    """The custom-loss loop in one process: mean = sum / count over the whole batch."""
    model = harness.tiny_model()
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for batch in harness.global_batches(STEPS)[:2]:
        ce, count = second_half_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss = ce / count
        loss.backward()
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(float(loss))
    with torch.no_grad():
        ce, count = second_half_loss(model(input_ids=EVAL_BATCH["input_ids"]).logits, EVAL_BATCH["labels"])
    return {"losses": losses, "eval": float(ce / count)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_clip_grad_norm_in_a_one_line_loop_matches_one_process(results, reference, layout):
    for rank, res in enumerate(results["ranks"]):
        got = res[layout]
        print(f"\n[clip] {layout} rank {rank}: norms {got['norms']} (reference {reference['norms']})")
        assert reference["norms"][0] > MAX_NORM  # the clipping is exercised
        assert got["norms"] == pytest.approx(reference["norms"], rel=1e-5)
        assert got["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-5)
        assert got["losses"] == pytest.approx(reference["losses"], rel=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_model_methods_on_the_parallelized_model(results, reference, layout):
    ref = reference["model"]
    emb = ref.get_input_embeddings().weight.numel()
    for rank, res in enumerate(results["ranks"]):
        hf = res[layout]["hf"]
        assert hf["num_parameters"] == ref.num_parameters()
        assert hf["num_parameters_no_embeddings"] == ref.num_parameters() - emb
        assert hf["generation_config"] == "GenerationConfig" and hf["is_gradient_checkpointing"] is False
        # The embedding lives on pipeline rank 0 only; an unknown attribute names what to do instead.
        first = layout != "pp" or rank == 0
        assert (hf["input_embeddings"] == "Embedding") if first else "first pipeline stage" in hf["input_embeddings"]
        assert "'resize_token_embeddings' is not available" in hf["unknown_attribute"]
        assert "save_pretrained" in hf["unknown_attribute"]
    # save_pretrained (every rank, streamed, 200 KB parts): plain transformers loads the trained
    # weights, equal to the single-process loop's.
    export = results["exports"][layout]
    assert "model.safetensors.index.json" in export["files"] and "config.json" in export["files"]
    want = reference["state"]
    assert sorted(export["state"]) == sorted(want)
    for key, tensor in want.items():
        diff = float((export["state"][key] - tensor).abs().max())
        assert diff <= 1e-4, f"{key}: max abs diff {diff:.2e}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_evaluation_returns_the_global_loss_and_leaves_gradients_alone(results, reference, layout):
    for rank, res in enumerate(results["ranks"]):
        ev = res[layout]["eval"]
        print(f"\n[eval] {layout} rank {rank}: {ev} (reference {reference['eval']})")
        assert ev["no_grad"] == pytest.approx(reference["eval"], rel=1e-4)
        assert ev["eval_mode"] == ev["no_grad"]
        assert ev["grads_after"] == 0  # the loop zeroed them; evaluation made none


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_param_groups_keep_their_own_lr_and_weight_decay(results, reference, layout):
    """No decay and half the lr on norms, decay on matrices: the same losses as one process on
    every layout (DeepSpeed maps each of its groups to the user's); named_parameters() gives the
    HF names; a grouping DeepSpeed cannot honour is refused, naming the groups and the fix."""
    names = {n for res in results["ranks"] for n in res[layout]["groups"]["names"]}
    assert names <= set(reference["groups"]["names"]) and any(_is_1d(n) for n in names)
    for rank, res in enumerate(results["ranks"]):
        got = res[layout]["groups"]["losses"]
        print(f"\n[groups] {layout} rank {rank}: {got} (reference {reference['groups']['losses']})")
        assert got == pytest.approx(reference["groups"]["losses"], rel=1e-4)
        if layout == "deepspeed":
            assert "share one DeepSpeed param group" in res[layout]["refused"]
            assert "backend=torch" in res[layout]["refused"]
            assert "SGD on a DeepSpeed layout" in res[layout]["refused_sgd"]
            assert "clip_grad_value_ on a DeepSpeed layout" in res[layout]["refused_sgd"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_custom_loss_fn_inside_the_schedule_matches_one_process(results, reference, layout):
    """enable_advanced_parallelization(loss_fn=...): the loss over only the second half of each
    sequence, with its own target count, given the whole global batch on every rank (the model
    takes its dp share), gives the single-process losses on every torch layout
    (pipeline: inside the schedule; TP: on vocab-sharded logits under loss_parallel) and in
    evaluation; DeepSpeed refuses it at from_pretrained, naming the fix."""
    ref = reference["custom_loss"]
    for rank, res in enumerate(results["ranks"]):
        got = res[layout]["custom_loss"]
        print(f"\n[loss_fn] {layout} rank {rank}: {got} (reference {ref})")
        if layout == "deepspeed":
            assert "loss_fn on a DeepSpeed layout" in got["refused"] and "backend=torch" in got["refused"]
            continue
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4)
        assert got["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-5)
        assert got["eval"] == pytest.approx(ref["eval"], rel=1e-4)
        assert "batch has 3 rows; the plan" in got["wrong_batch"]
        assert f"takes {harness.GLOBAL_ROWS} rows per step" in got["wrong_batch"]
        assert "enable_advanced_parallelization(global_batch_size=3)" in got["wrong_batch"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_evaluation_without_labels_returns_the_full_logits(results, reference, layout):
    """model(input_ids) under no_grad returns this rank's rows' full-vocabulary logits (TP: the
    vocab shards gathered), equal to one process's; pipeline layouts refuse with the fix."""
    ref = reference["logits"]
    for rank, res in enumerate(results["ranks"]):
        got = res[layout]["eval"]["logits"]
        if layout == "pp":
            assert "not available on a pipeline-parallel layout" in got["refused"]
            continue
        rows = slice(rank * (len(ref) // WORLD), (rank + 1) * (len(ref) // WORLD)) if layout != "tp" else slice(None)
        assert got["vocab"] == ref.shape[-1]
        torch.testing.assert_close(torch.tensor(got["head"]), ref[rows][..., :8], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(got["row_sums"]), ref[rows].sum(-1), atol=1e-3, rtol=0)
