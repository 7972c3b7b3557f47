"""What is live when a dry-run step peaks: every storage an op creates during the step is
filed under the op that made it, the module that ran it (decoder layers folded into `layers.*`) and the
phase (forward / backward), and the composition of the live set is kept at the moment it
is largest. The trackers give the peak by category; this says which tensors make it up, so
a gap between the planner and the dry run can be pinned to a term (docs/planner.md, "How the
planner is checked").

    raytune-llama dryrun CONFIG.yaml --rank 0 --explain 12     # the 12 largest groups at the peak

Storages that existed before the step (parameters, optimizer state) are not listed: they are
the tracker's params/optimizer rows, which the planner already matches exactly.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary, weakref

_EMPTY_LIKE = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}
_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def _plain_tensors(tree) -> list[torch.Tensor]:
    # Tensor subclasses (DTensor, FSDP's and the collectives' wrappers) hold their bytes in
    # inner tensors; the wrapper's own "storage" has the global size and is not allocated.
    out, todo = [], [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]
    while todo:
        t = todo.pop()
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            todo.extend(x for x in (getattr(t, n) for n in names) if isinstance(x, torch.Tensor))
        elif not t.is_meta:
            out.append(t)
    return out


def _module_label(parents: set[str]) -> str:
    # The innermost module: the longest fully qualified name among the active parents.
    names = [p for p in parents if p != "Global"]
    if not names:
        return "(step)"
    name = max(names, key=len)
    name = name.split(".", 1)[1] if "." in name else name  # drop the root's class name
    return _LAYER_INDEX.sub(".*", name)


class LiveAtPeak(TorchDispatchMode):
    """Dispatch mode that files each newly created storage under "phase module op" and keeps
    the live bytes per group at the step's largest live total. `mod_tracker` is the memory
    tracker's ModTracker (it knows the active modules and whether backward is running);
    `fake_mode` the dry run's FakeTensorMode (tensors of other fake modes are not allocations).
    Enter it before (below) the memory tracker: it then also sees the ops a DTensor runs on its
    local tensors, e.g. the fp32 temporaries of the vocab-parallel cross-entropy."""

    def __init__(self, mod_tracker, fake_mode=None):
        super().__init__()
        self._mods = mod_tracker
        self._fake_mode = fake_mode
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}
        # Storages FSDP2 frees and re-allocates in place (untyped_storage().resize_, which no
        # dispatch mode sees): those made by empty-like ops, re-measured at every op.
        self._resizable: dict[int, list] = {}
        self._live: dict[str, int] = defaultdict(int)
        self._count: dict[str, int] = defaultdict(int)
        self.current = 0
        self.peak = 0
        self.at_peak: dict[str, tuple[int, int]] = {}

    def _freed(self, label: str, nbytes: int, key: int, _ref) -> None:
        self._refs.pop(key, None)
        entry = self._resizable.pop(key, None)
        if entry is not None:  # freed at its current size, under its current label
            label, nbytes = entry[1], entry[2]
        self._live[label] -= nbytes
        self._count[label] -= 1
        self.current -= nbytes

    def _remeasure(self, op: str) -> None:
        for key, entry in self._resizable.items():
            st = entry[0]()
            if st is None:
                continue
            nbytes = st.nbytes()
            if nbytes != entry[2]:
                label = entry[1] if nbytes < entry[2] else self._label(f"{op}(regathered)")
                self._live[entry[1]] -= entry[2]
                self._count[entry[1]] -= 1
                self._live[label] += nbytes
                self._count[label] += 1
                self.current += nbytes - entry[2]
                entry[1], entry[2] = label, nbytes

    def _label(self, op: str) -> str:
        phase = "backward" if self._mods.is_bw else "forward"
        return f"{phase} {_module_label(self._mods.parents)} {op}"

    def _note_peak(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = {k: (v, self._count[k]) for k, v in self._live.items() if v > 0}

    def _created(self, t: torch.Tensor, op: str) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        nbytes = st.nbytes()
        self._seen[st] = True
        if nbytes == 0:
            return
        label = self._label(op)
        key = id(st)
        ref = weakref.ref(st, lambda r, lb=label, n=nbytes, k=key: self._freed(lb, n, k, r))
        self._refs[key] = ref
        if op in _EMPTY_LIKE:
            self._resizable[key] = [ref, label, nbytes]
        self._live[label] += nbytes
        self._count[label] += 1
        self.current += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.overloadpacket.__name__
        # Views, in-place ops and detach return storages an input already has.
        inputs = {id(t.untyped_storage()) for t in _plain_tensors((args, kwargs))}
        self._remeasure(op)
        for t in _plain_tensors(out):
            # DTensor's sharding propagation runs ops on global-size fake tensors of its own mode.
            if self._fake_mode is not None and getattr(t, "fake_mode", self._fake_mode) is not self._fake_mode:
                continue
            if id(t.untyped_storage()) not in inputs:
                self._created(t, op)
        self._note_peak()
        return out

    def top(self, n: int) -> list[dict]:
        """The `n` largest groups live at the peak: label, bytes, number of storages."""
        rows = sorted(self.at_peak.items(), key=lambda kv: -kv[1][0])[:n]
        return [{"group": k, "bytes": v, "storages": c} for k, (v, c) in rows]
