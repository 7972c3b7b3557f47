"""Ray-side helpers for a user's own training loop (the one-line API): the batches of this
data-parallel rank, and a progress record per step for the driver.

    for batch in raytune_llama.get_dataset_shard("train"):   # one epoch per loop
        ...
        raytune_llama.log_step(loss=loss.item())
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Iterator, Optional


from raytune_llama.engine.data.order import SampleOrder
from raytune_llama.engine.data.store import TokenStore
from raytune_llama.engine.one_line import PLAN_ENV, active_engine
from raytune_llama.engine.parallel_causal_lm import serve_batch_positions
from raytune_llama.trainer.batches import model_inputs, rank_batch

BOARD_ENV = "RAYTUNE_LLAMA_PROGRESS_ACTOR"
DATA_ENV = "RAYTUNE_LLAMA_DATA"


def user_loop_env(plan, board_name: str, token_store: str, cfg) -> dict[str, str]:
    """Worker environment that tells the one-line API the plan, the data and the progress actor."""
    return {
        PLAN_ENV: json.dumps(plan.to_dict()),
        BOARD_ENV: board_name,
        DATA_ENV: json.dumps({"token_store": token_store, "global_batch": cfg.train.global_batch_size,
                              "seed": cfg.data.shuffle_seed, "shuffle": cfg.data.shuffle,
                              "window": cfg.data.shuffle_window,
                              "with_ids": cfg.data.id_column is not None, "max_steps": cfg.train.max_steps}),
    }


class RankBatches:
    """Iterable over this dp rank's rows of each global batch, one epoch per iteration (the
    first `for` is epoch 0, the next epoch 1, each in its own seeded order), the same order at
    every world size."""

    def __init__(self, name: str = "train"):
        if name != "train":
            raise ValueError(f"get_dataset_shard: only the run's 'train' data exists, not {name!r}")
        data = json.loads(os.environ.get(DATA_ENV, "{}"))
        if "token_store" not in data:
            raise RuntimeError("get_dataset_shard works inside a run started by raytune_llama "
                               "(LlamaTrainer.launch or `raytune-llama finetune`), which builds the token store")
        self.store = TokenStore(data["token_store"])
        self.global_batch = data["global_batch"]
        self.order = SampleOrder(self.store, self.global_batch, data["seed"], data["shuffle"], data["window"])
        self.with_ids = data.get("with_ids", False)
        self.cursor = _resumed.pop("cursor", 0)  # the next sample (resume() may have set it)
        self.last_batch_tokens = 0

    def __len__(self) -> int:
        """Global batches per epoch (waits until the whole corpus is tokenized)."""
        while self.order.samples_per_epoch() is None:
            time.sleep(0.5)
        return self.order.samples_per_epoch() // self.global_batch

    def __iter__(self) -> Iterator[dict]:
        engine = active_engine()
        if engine is None:
            raise RuntimeError("call AutoModelForCausalLM.from_pretrained (after "
                               "enable_advanced_parallelization()) before iterating the dataset shard")
        if _last_step["time"] is None:
            _last_step["time"] = time.perf_counter()  # the first step's time starts here
        epoch, _ = self.order.epoch_and_offset(self.cursor)
        while self.order.epoch_and_offset(self.cursor)[0] == epoch:
            batch = rank_batch(self.store, self.order, self.cursor, engine.dp_rank, engine.dp_size, self.with_ids)
            self.cursor += self.global_batch
            self.last_batch_tokens = batch.global_tokens
            inputs = model_inputs(batch.rows)
            # A loop that passes only input_ids still gets document packing's attention mask.
            serve_batch_positions(inputs["input_ids"], inputs.get("position_ids"))
            yield inputs


_shards: dict[str, RankBatches] = {}
_last_step: dict = {"time": None, "step": 0}
_resumed: dict = {}


def restore_data_position(cursor: int) -> None:
    """Continue get_dataset_shard("train") at sample `cursor` (raytune_llama.resume)."""
    if "train" in _shards:
        _shards["train"].cursor = cursor
    else:
        _resumed["cursor"] = cursor


def get_dataset_shard(name: str = "train") -> RankBatches:
    """This worker's view of the run's dataset: its dp rank's rows of each global batch."""
    if name not in _shards:
        _shards[name] = RankBatches(name)
    return _shards[name]


def log_step(loss: float, step: Optional[int] = None, **extra) -> None:
    """Record one optimizer step (rank 0 sends it to the driver's progress line and summary)."""
    import ray
    import ray.train

    now = time.perf_counter()
    previous = _last_step["time"]
    _last_step.update(time=now, step=step if step is not None else _last_step["step"] + 1)
    ctx = ray.train.get_context()
    if ctx.get_world_rank() != 0:
        return
    shard = _shards.get("train")
    tokens = shard.last_batch_tokens if shard else 0
    step_time = max(now - (previous or now), 1e-9)
    data = json.loads(os.environ.get(DATA_ENV, "{}"))
    record = {"step": _last_step["step"], "loss": float(loss), "lr": float(extra.pop("lr", 0.0)),
              "step_time_s": step_time, "tokens_per_s": tokens / step_time,
              "world_size": ctx.get_world_size(), "max_steps": data.get("max_steps", 0), **extra}
    if os.environ.get(BOARD_ENV):
        ray.get_actor(os.environ[BOARD_ENV]).push.remote(record)


def guard_user_loop(train_fn, config: dict) -> "GuardedUserLoop":
    """train_fn wrapped for the worker: every training forward of the parallelized model (where a
    rank stuck in a collective hangs) runs under the run's step watchdog (trainer/step_guard.py,
    run.step_timeout_s / run.collective_timeout_s), as `raytune-llama finetune`'s loop does; a
    stalled rank is reported to the driver and ends its worker for a restart. Steps are counted
    from the last logged or resumed step; the step after save_checkpoint keeps the long bound."""
    return GuardedUserLoop(train_fn, config)


class GuardedUserLoop:
    """A module-level class, so that the worker runs it against this module's own step state
    (a closure would be pickled by value, with a copy of that state that log_step never updates)."""

    def __init__(self, train_fn, config: dict):
        self.train_fn, self.config = train_fn, config

    def __call__(self, args):
        import ray.train

        from raytune_llama.config import config_from_dict
        from raytune_llama.engine.parallel_causal_lm import ParallelCausalLM
        from raytune_llama.testing.fault_injection import stall_hook
        from raytune_llama import console
        from raytune_llama.trainer.step_guard import make_step_watchdog

        console.quiet_worker()  # as finetune's own loop: per-rank INFO lines to Ray Train's worker log
        cfg = config_from_dict(self.config)
        rank = ray.train.get_context().get_world_rank()
        board = ray.get_actor(os.environ[BOARD_ENV]) if os.environ.get(BOARD_ENV) else None
        watchdog = make_step_watchdog(cfg, rank, board)
        stall = stall_hook(rank, cfg.run_dir)  # fault injection (RAYTUNE_LLAMA_STALL): None normally

        @contextlib.contextmanager
        def guard():
            step = _last_step["step"] + 1
            with watchdog.step(step, relaxed=_last_step.pop("checkpointed", False)):
                if stall is not None:
                    stall(step)
                yield

        ParallelCausalLM.step_guard = guard
        try:
            return self.train_fn(args)
        finally:
            ParallelCausalLM.step_guard = None
            watchdog.close()


def note_checkpoint(step: int) -> None:
    """save_checkpoint / resume: the loop is at `step`; after a save the next step keeps the long bound."""
    _last_step["step"] = step
    _last_step["checkpointed"] = True
