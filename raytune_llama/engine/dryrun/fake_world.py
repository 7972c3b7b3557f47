"""The fake world a dry run executes in: torch's fake process group (any world size in one
process), fake tensors on the CPU (shapes and dtypes only, no storage), and memory trackers
that tolerate the engine's micro-batch loop. Used by engine/dryrun/run.py; see
docs/planner.md, "How the planner is checked".

    .venv/bin/python -m pytest tests/unit/test_dryrun.py -q

Each helper is a context manager that restores what it changed, so a dry run leaves no
process group, patched attribute or dispatch mode behind.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# The device the fake tensors claim: torch's CPU-only builds cannot fake "cuda" (FSDP2 asks
# torch.cuda for the current device), and the tensors only carry shape and dtype anyway.
FAKE_DEVICE = "cpu"


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """torch.distributed initialised with the "fake" backend as `rank` of `world_size`; destroyed on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            f"a dry run needs its own fake process group, but torch.distributed is already initialised "
            f"(backend {dist.get_backend()!r}, world {dist.get_world_size()}); run the dry run in a process "
            f"without a real process group (e.g. the `raytune-llama dryrun` command)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must be in 0..world_size-1 (world_size {world_size})")
    _clear_dtensor_caches()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        _clear_dtensor_caches()


def _clear_dtensor_caches() -> None:
    # DTensor caches sharding decisions by mesh shape, and a cached spec keeps the process
    # groups of the mesh it was made with: a later world (the next dry-run rank, or a real
    # process group) must not resolve groups that no longer exist.
    from torch.distributed.tensor import DTensor

    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.propagate_op_sharding.cache_clear()
    propagator._propagate_tensor_meta_cached.cache_clear()


@contextlib.contextmanager
def patched(owner, name: str, value) -> Iterator[None]:
    """Set `owner.name` to `value` for the duration of the block (module or object attribute)."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def fresh_sharding_propagation() -> Iterator[None]:
    """Make DTensor's sharding propagation use its own FakeTensorMode instead of the dry run's:
    otherwise the trackers count its full-size propagation tensors as allocations of this rank."""
    from torch.distributed.tensor import _sharding_prop

    with patched(_sharding_prop, "detect_fake_mode", lambda *args, **kwargs: None):
        yield


@contextlib.contextmanager
def fake_weight_materialisation(fake_mode) -> Iterator[None]:
    """The engine's sharded load, with the reading left out: `parallelize` allocates each
    stage's local shards (to_empty after TP/FSDP, ties and rotary rebuilt, exactly as for a real
    run) as fake tensors instead of reading them from safetensors."""
    from raytune_llama.engine.parallel import sharded_load

    parallelize_module = sys.modules["raytune_llama.engine.parallel.parallelize"]

    def allocate_only(stages, path, device, read_weights=True, adapters=None):
        with fake_mode:
            return sharded_load.materialize_and_load(stages, path, device, read_weights=False)

    with patched(parallelize_module, "materialize_and_load", allocate_only):
        yield


class FakeScalars(TorchDispatchMode):
    """Answers `.item()` on a fake tensor whose value is unknown with 1: the step's token count,
    loss and gradient norm, and the pipeline schedule's warm-up vote (1 = every stage has static
    shapes, so no shape metadata is exchanged over the fake process group). Values a fake tensor
    does know (made from Python numbers) are returned as they are."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            from torch._subclasses.fake_tensor import DataDependentOutputException

            try:  # a fake tensor made from Python numbers still knows its value
                return func(*args, **(kwargs or {}))
            except DataDependentOutputException:
                t = args[0]
                return True if t.dtype == torch.bool else 1.0 if t.dtype.is_floating_point else 1
        from torch._subclasses.fake_tensor import FakeTensor

        # Other tensor subclasses (DTensor, the functional collectives' AsyncCollectiveTensor)
        # unwrap themselves first and come back here with plain fake tensors.
        if any(t is not torch.Tensor and t is not torch.nn.Parameter and not issubclass(t, FakeTensor)
               for t in types):
            return NotImplemented
        return func(*args, **(kwargs or {}))


def _pop_on_new_forward(tracker, module) -> None:
    # The engine forwards the same root once per micro-batch; the trackers only allow one
    # forward per root and step. Their per-module statistics are not used (the peak by
    # category is global), so a module forwarded again starts fresh statistics.
    if module in tracker.memory_tracking and not tracker._mod_tracker.is_bw:
        tracker.memory_tracking.pop(module)


def memory_tracker(modules: list, optimizer):
    """A tracker for this rank's stage modules: FSDPMemTracker (sharded/unsharded parameters and
    gradients, all-gather and reduce-scatter buffers) where every module is an FSDP2 root,
    else the generic MemTracker (parameters, gradients, activations, temporaries)."""
    from torch import nn
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    if all(isinstance(m, FSDPModule) for m in modules):
        class StepFSDPTracker(FSDPMemTracker):
            def _fsdp_state_pre_forward(self, fsdp_mod, orig):
                inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)

                def pre_forward(*args, **kwargs):
                    _pop_on_new_forward(self, fsdp_mod)
                    return inner(*args, **kwargs)
                return pre_forward

            def _fsdp_param_group_post_backward(self, fsdp_mod, orig):
                inner = super()._fsdp_param_group_post_backward(fsdp_mod, orig)

                def post_backward(*args, **kwargs):
                    inner(*args, **kwargs)
                    # Without gradient sync (ZeRO-1 before the last micro-batch, every pipelined
                    # backward) FSDP2 accumulates unsharded grads in the reduce dtype; the
                    # tracker would file them as backward temporaries.
                    group = fsdp_mod._get_fsdp_state()._fsdp_param_group
                    for fsdp_param in group.fsdp_params if group else ():
                        acc = fsdp_param.unsharded_accumulated_grad
                        if acc is not None:
                            self._update_and_maybe_create_winfos(acc, _FSDPRefType.UNSHARDED_GRAD,
                                                                 update_existing=True)
                return post_backward

        tracker = StepFSDPTracker(modules[0], optimizer)
        if len(modules) > 1:  # virtual pipeline stages: several FSDP roots on this rank
            tracker._root_mod = nn.ModuleList(modules)
        return tracker

    class StepTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs):
            _pop_on_new_forward(self, module)
            super()._pre_fw_hook(module, inputs)

    tracker = StepTracker()
    tracker.track_external(*modules, optimizer)
    return tracker


def set_static_pipeline_shapes(pipe_stages, inputs: list, outputs: list) -> None:
    """Give each PipelineStage its input/output metadata up front (what `PipelineStage(...,
    input_args=, output_args=)` would record): the fake process group carries no shape
    messages, so the schedule must not infer them at run time."""
    from torch.distributed.pipelining._utils import _StageMeta, extract_tensor_metas

    for stage, inp, out in zip(pipe_stages, inputs, outputs):
        stage._user_meta = _StageMeta(inputs=extract_tensor_metas((inp,)), outputs=extract_tensor_metas((out,)))


def fake_ddp_allreduce(module) -> None:
    """Give a classic DDP module a gradient hook that returns each bucket as reduced: the fake
    group's all-reduce completes with no result, which DDP's reducer refuses; torch's default
    hook all-reduces the bucket in place, so the memory is the same."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(module, DistributedDataParallel):
        return

    def in_place(state, bucket):
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    module.register_comm_hook(state=None, hook=in_place)
