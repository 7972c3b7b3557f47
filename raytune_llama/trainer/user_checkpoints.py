"""Checkpoints in a user's own loop (the one-line API): a pair of calls that save and restore
the parallelized model's shards, the loop's own optimizer and LR scheduler, the step and the
position in `get_dataset_shard("train")`, through Ray Train like `raytune-llama finetune`'s
checkpoints (trainer/checkpoint_report.py: written in place on a filesystem storage path,
hashed while written, verified by every rank on resume, resharded to any layout).

    step = raytune_llama.resume(optim, scheduler)          # 0 on a fresh run
    for batch in raytune_llama.get_dataset_shard("train"):  # continues at the saved sample
        ...; step += 1
        if step % 20 == 0:
            raytune_llama.save_checkpoint(step, optim, scheduler)   # every rank
"""
from __future__ import annotations

import json

from raytune_llama.engine.checkpoint_io import resolve_format
from raytune_llama.engine.one_line import active_engine


def _engine():
    engine = active_engine()
    if engine is None:
        raise RuntimeError("call AutoModelForCausalLM.from_pretrained (after enable_advanced_parallelization()) "
                           "before save_checkpoint / resume: they save and restore that model")
    return engine


def save_checkpoint(step: int, optimizer, scheduler=None, **metrics) -> None:
    """Collective (every rank, same step): checkpoint the model's shards, `optimizer`'s state,
    `scheduler.state_dict()`, the step and the data position, and report it to Ray Train with
    `metrics` (Ray Train keeps checkpoint.keep_last of them)."""
    import ray.train

    from raytune_llama.trainer import checkpoint_report
    from raytune_llama.trainer.user_loop import _shards, note_checkpoint

    engine = _engine()
    shard = _shards.get("train")
    meta = {"step": int(step), "cursor": shard.cursor if shard is not None else None, "tokens_seen": 0,
            "world_size": ray.train.get_context().get_world_size(), "user_loop": True,
            "scheduler": None if scheduler is None else _json_state(scheduler)}
    with engine.using_optimizer(optimizer):
        checkpoint_report.save_and_report({"step": int(step), **metrics}, engine, meta,
                                          resolve_format("auto", engine.plan))
    note_checkpoint(int(step))


def resume(optimizer, scheduler=None) -> int:
    """Collective (every rank, after from_pretrained and after building `optimizer` and
    `scheduler`): load the newest valid checkpoint of this run into the model (in this run's
    layout, whatever layout saved it), `optimizer` and `scheduler`, move get_dataset_shard to
    the saved sample, and return the saved step (0 when the run has no checkpoint yet)."""
    from raytune_llama.trainer import checkpoint_report
    from raytune_llama.trainer.user_loop import note_checkpoint, restore_data_position

    engine = _engine()
    meta = checkpoint_report.restore_latest(engine, checkpoint_report.run_dir_on_filesystem(), optimizer)
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if meta.get("cursor") is not None:
        restore_data_position(int(meta["cursor"]))
    note_checkpoint(int(meta.get("step", 0)))
    return int(meta.get("step", 0))


def _json_state(scheduler) -> dict:
    state = scheduler.state_dict()
    try:
        json.dumps(state)
    except TypeError as exc:
        raise ValueError(f"scheduler: {type(scheduler).__name__}.state_dict() is not JSON ({exc}); save_checkpoint "
                         f"keeps the scheduler state in the checkpoint's meta.json: pass a torch or transformers LR "
                         f"scheduler, or scheduler=None and restore it yourself from the step") from exc
    return state

