"""What diffprune keeps per model between applies of patches (apply.py): cached fingerprints,
what the last apply wrote, and what each patch's apply prepared.

Hashing MiniLM's 22.7M base weights takes ~120 ms, against ~1 ms for an apply and revert, so
the fingerprint is cached per model (beside it, in a WeakKeyDictionary: nothing is added to the
model, and the entry dies with it), keyed by each base parameter's identity, storage, dtype,
shape and version counter. torch bumps a tensor's version counter on every in-place change it
tracks (an optimizer step, load_state_dict, copy_ under no_grad, a write through a view or
detach()), so any such change makes the key differ and the next apply hashes the weights again.
Writes that torch does not track, through `.data` or a numpy view, are not seen: do not apply a
patch to a model changed that way after an apply on it.

An apply bumps the versions of what it writes, which would make every apply after a revert hash
everything again. But a revert restores those bits exactly, so when it finds the versions
exactly as its own apply left them (nothing wrote there since), it re-validates the cached
fingerprint under the versions after the revert.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from diffprune.base import fingerprint
from diffprune.patch.compact import CompactDiffs, CompactPatch
from diffprune.patch.kinds import SparseDiff

if TYPE_CHECKING:
    from diffprune.patch.apply import AppliedPatch
    from diffprune.patch.taskpatch import TaskPatch


class Written(list):
    """(parameter, version, storage) of each tensor an apply wrote, right after it wrote them.
    The model's state keeps this, not the AppliedPatch, so that a handle nobody will revert
    (a model patched for good) does not keep the original entries alive with the model."""

    def unchanged(self) -> bool:
        """Whether those tensors still hold exactly what the apply wrote (nothing wrote there since)."""
        return all(p._version == v and p.data_ptr() == ptr for p, v, ptr in self)


def params_key(params: dict[str, nn.Parameter]) -> tuple:
    """What torch tells cheaply about the contents of `params` (~40 us for MiniLM's 103 tensors)."""
    return tuple((n, id(p), p.data_ptr(), p.dtype, p.shape, p._version) for n, p in params.items())


@dataclass
class Fingerprint:
    """A fingerprint of the base parameters valid while their key is `key`."""

    names: tuple[str, ...]
    key: tuple
    refs: list  # weak references: a new parameter object that reuses a freed one's id() still differs
    value: str

    def holds_for(self, key: tuple, params: dict[str, nn.Parameter]) -> bool:
        return key == self.key and all(r() is p for r, p in zip(self.refs, params.values()))


@dataclass
class Entry:
    """One changed tensor of a patch, ready to write into one parameter of one model."""

    param: nn.Parameter
    data_ptr: int
    diff: SparseDiff  # the change it was prepared from
    flat: torch.Tensor
    positions: torch.Tensor  # on the parameter's device
    values: torch.Tensor  # what an apply writes at the positions: base + diff for "add", the values for "sparse"
    originals: torch.Tensor | None  # the base entries at the positions (None for "sparse")
    whole: bool = False  # a small tensor: values and originals are the whole tensor, patched and base

    def holds_for(self, param: nn.Parameter | None) -> bool:
        return param is self.param and param.data_ptr() == self.data_ptr


class Flats:
    """The model's parameters as flat numpy views in a numba list, what the compact kernels
    write into; valid while every parameter is the same object at the same memory (`key`).
    Only float32 contiguous CPU parameters are `writable`."""

    def __init__(self, params: dict[str, nn.Parameter], key: tuple) -> None:
        from numba import typed, types

        self.key, self.params = key, list(params.values())
        self.index = {n: i for i, n in enumerate(params)}
        self.writable = set()
        self.arrays = typed.List.empty_list(types.float32[::1])
        for name, p in params.items():
            ok = p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
            self.arrays.append(p.detach().view(-1).numpy() if ok else np.empty(0, np.float32))
            if ok:
                self.writable.add(name)

    @staticmethod
    def key_of(params: dict[str, nn.Parameter]) -> tuple:
        return tuple((id(p), p.data_ptr()) for p in params.values())


class Prepared(dict):
    """What applying one patch to one model needs, built at its first apply: name -> Entry for
    the changes torch ops write, and `compact`, the "add" changes the kernels write."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[str, object] = {}  # name -> the patch's own change it was prepared from
        self.by_torch: dict[str, SparseDiff] = {}  # the changes written entry by entry
        self.compact: CompactDiffs | None = None
        self.own_compact = False  # built here from SparseDiffs: memory beyond the patch
        self.flats: Flats | None = None
        self.which: np.ndarray | None = None  # compact tensor t is flats.arrays[which[t]]
        self.touched: dict[str, nn.Parameter] = {}  # the parameters the kernels write
        self.splits: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # threads -> the kernels' work split

    def reset(self) -> None:
        self.clear()
        self.__init__()

    def nbytes(self) -> int:
        """The memory kept beyond the patch (originals, device copies, a compact form built here)."""
        extra = 0
        for e in self.values():  # a small tensor's base copy is shared by every patch: not counted
            extra += e.originals.nbytes if e.originals is not None and not e.whole else 0
            extra += 0 if e.positions is e.diff.positions else e.positions.nbytes
            extra += 0 if e.values is e.diff.values else e.values.nbytes
        if self.compact is not None:
            extra += self.which.nbytes + (self.compact.nbytes if self.own_compact else 0)
            extra += sum(work.nbytes + bounds.nbytes for work, bounds in self.splits.values())
        return extra


class ModelState:
    """What diffprune knows about one model between calls: cached fingerprints (one per set of
    base parameter names), what the last apply not yet reverted wrote, and the patches prepared
    for it (by id, dropped when the patch dies)."""

    def __init__(self) -> None:
        self.fingerprints: dict[tuple[str, ...], Fingerprint] = {}
        self.applied: Written | None = None
        self.prepared: dict[int, tuple[weakref.ref, Prepared]] = {}
        self.base_copies: dict[str, tuple[nn.Parameter, int, str, torch.Tensor]] = {}
        self._flats: Flats | None = None
        self._spare = (np.empty(0, np.float32), np.empty(0, np.int64))

    def take_buffers(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Room for the entries and positions an apply keeps until its revert: those a revert
        gave back, if large enough (one patch is applied at a time, and writing into fresh memory
        pays a page fault every 4 KiB: more than the whole apply). Held by no task."""
        spare, self._spare = self._spare, (np.empty(0, np.float32), np.empty(0, np.int64))
        if spare[0].size >= size:
            return spare[0][:size], spare[1][:size]
        return np.empty(size, np.float32), np.empty(size, np.int64)

    def give_back(self, buffers: tuple[np.ndarray, np.ndarray]) -> None:
        whole = tuple(b if b.base is None else b.base for b in buffers)
        if whole[0].size > self._spare[0].size:
            self._spare = whole

    def flats(self, params: dict[str, nn.Parameter]) -> Flats:
        key = Flats.key_of(params)
        if self._flats is None or self._flats.key != key:
            self._flats = Flats(params, key)
        return self._flats

    def base_copy(self, name: str, p: nn.Parameter, base: str) -> torch.Tensor:
        """A copy of a small tensor of the base with fingerprint `base`, shared by every patch
        prepared on this model for that base. Taken right after a fingerprint check, kept for
        this very parameter at this very memory."""
        found = self.base_copies.get(name)
        if found is None or found[0] is not p or found[1] != p.data_ptr() or found[2] != base:
            found = self.base_copies[name] = (p, p.data_ptr(), base, p.detach().reshape(-1).clone())
        return found[3]

    def prepared_for(self, patch: TaskPatch | CompactPatch) -> Prepared:
        key = id(patch)
        found = self.prepared.get(key)
        if found is not None and found[0]() is patch:
            return found[1]
        prepared = Prepared()
        self.prepared[key] = (weakref.ref(patch, lambda _, key=key: self.prepared.pop(key, None)), prepared)
        return prepared

    def fingerprint(self, params: dict[str, nn.Parameter]) -> Fingerprint:
        names, key = tuple(params), params_key(params)
        cached = self.fingerprints.get(names)
        if cached is None or not cached.holds_for(key, params):
            cached = Fingerprint(names, key, [weakref.ref(p) for p in params.values()], fingerprint(params))
            self.fingerprints[names] = cached
        return cached

    def reverted(self, applied: AppliedPatch, intact: bool) -> None:
        if self.applied is applied._written:
            self.applied = None
        before = applied._fingerprint
        if not intact or before is None or self.fingerprints.get(before.names) is not before:
            return
        # The patched tensors hold their pre-apply bits again: only their versions moved. Every
        # other tensor keeps its pre-apply version in the key, so a change to one is still seen.
        now = {n: p._version for n, p in applied._touched_base.items()}
        key = tuple((*entry[:-1], now.get(entry[0], entry[-1])) for entry in before.key)
        self.fingerprints[before.names] = Fingerprint(before.names, key, before.refs, before.value)


STATES: weakref.WeakKeyDictionary[nn.Module, ModelState] = weakref.WeakKeyDictionary()


def state_of(model: nn.Module) -> ModelState:
    try:
        return STATES.setdefault(model, ModelState())
    except TypeError:  # a module that cannot be hashed or weakly referenced: nothing is cached
        return ModelState()


def prepared_nbytes(patch: TaskPatch | CompactPatch, model: nn.Module) -> int:
    """The memory that applying `patch` to `model` keeps between applies (0 before the first)."""
    state = STATES.get(model)
    found = state.prepared.get(id(patch)) if state is not None else None
    return found[1].nbytes() if found is not None and found[0]() is patch else 0
