"""Applying a patch to a model in place and reverting it bit for bit (exporting: export.py).

`apply_patch` verifies the model it is given instead of trusting its caller: the base fingerprint
is computed on the model's own weights, so another base, or a base that already carries a patch
(its weights are no longer the base's), is refused.

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

Serving switches tasks on every batch, so what an apply needs beyond the check is kept per model
and patch (`_Prepared`): positions and values on the parameters' device and dtype, and the base
entries at the positions, read once. Those entries are the base's because every apply checks the
fingerprint first, and they are only reused for the very parameter objects, at the same memory,
that they were read from. An apply is then one indexed write per tensor, a revert another;
small tensors (biases, norms) are copied whole from a patched copy, all in one call (a call per
tensor costs more than the copy).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffprune.base import BaseModel, fingerprint
from diffprune.errors import DiffpruneError
from diffprune.patch.kinds import ADD, SPARSE, SparseDiff

if TYPE_CHECKING:
    from diffprune.patch.taskpatch import TaskPatch


class _Written(list):
    """(parameter, version, storage) of each tensor an apply wrote, right after it wrote them.
    The model's state keeps this, not the AppliedPatch, so that a handle nobody will revert
    (a model patched for good) does not keep the original entries alive with the model."""

    def unchanged(self) -> bool:
        """Whether those tensors still hold exactly what the apply wrote (nothing wrote there since)."""
        return all(p._version == v and p.data_ptr() == ptr for p, v, ptr in self)


def _key(params: dict[str, nn.Parameter]) -> tuple:
    """What torch tells cheaply about the contents of `params` (~40 us for MiniLM's 103 tensors)."""
    return tuple((n, id(p), p.data_ptr(), p.dtype, p.shape, p._version) for n, p in params.items())


@dataclass
class _Fingerprint:
    """A fingerprint of the base parameters valid while their key is `key`."""

    names: tuple[str, ...]
    key: tuple
    refs: list  # weak references: a new parameter object that reuses a freed one's id() still differs
    value: str

    def holds_for(self, key: tuple, params: dict[str, nn.Parameter]) -> bool:
        return key == self.key and all(r() is p for r, p in zip(self.refs, params.values()))


@dataclass
class _Entry:
    """One changed tensor of a patch, ready to write into one parameter of one model."""

    param: nn.Parameter
    data_ptr: int
    diff: SparseDiff  # the patch's own change; a change replaced since makes the entry stale
    flat: torch.Tensor
    positions: torch.Tensor  # on the parameter's device
    values: torch.Tensor  # what an apply writes at the positions: base + diff for "add", the values for "sparse"
    originals: torch.Tensor | None  # the base entries at the positions (None for "sparse")
    whole: bool = False  # a small tensor: values and originals are the whole tensor, patched and base

    def holds_for(self, param: nn.Parameter | None, diff: SparseDiff) -> bool:
        return param is self.param and param.data_ptr() == self.data_ptr and diff is self.diff


class _Prepared(dict):
    """name -> _Entry for every change of one patch on one model, built at its first apply."""

    def nbytes(self) -> int:
        """The memory the entries add beyond the patch (originals, device copies)."""
        extra = 0
        for e in self.values():  # a small tensor's base copy is shared by every patch: not counted
            extra += e.originals.nbytes if e.originals is not None and not e.whole else 0
            extra += 0 if e.positions is e.diff.positions else e.positions.nbytes
            extra += 0 if e.values is e.diff.values else e.values.nbytes
        return extra


class _ModelState:
    """What diffprune knows about one model between calls: cached fingerprints (one per set of
    base parameter names), what the last apply not yet reverted wrote, and the patches prepared
    for it (by id, dropped when the patch dies)."""

    def __init__(self) -> None:
        self.fingerprints: dict[tuple[str, ...], _Fingerprint] = {}
        self.applied: _Written | None = None
        self.prepared: dict[int, tuple[weakref.ref, _Prepared]] = {}
        self.base_copies: dict[str, tuple[nn.Parameter, int, str, torch.Tensor]] = {}

    def base_copy(self, name: str, p: nn.Parameter, base: str) -> torch.Tensor:
        """A copy of a small tensor of the base with fingerprint `base`, shared by every patch
        prepared on this model for that base. Taken right after a fingerprint check, kept for
        this very parameter at this very memory."""
        found = self.base_copies.get(name)
        if found is None or found[0] is not p or found[1] != p.data_ptr() or found[2] != base:
            found = self.base_copies[name] = (p, p.data_ptr(), base, p.detach().reshape(-1).clone())
        return found[3]

    def prepared_for(self, patch: TaskPatch) -> _Prepared:
        key = id(patch)
        found = self.prepared.get(key)
        if found is not None and found[0]() is patch:
            return found[1]
        prepared = _Prepared()
        self.prepared[key] = (weakref.ref(patch, lambda _, key=key: self.prepared.pop(key, None)), prepared)
        return prepared

    def fingerprint(self, params: dict[str, nn.Parameter]) -> _Fingerprint:
        names, key = tuple(params), _key(params)
        cached = self.fingerprints.get(names)
        if cached is None or not cached.holds_for(key, params):
            cached = _Fingerprint(names, key, [weakref.ref(p) for p in params.values()], fingerprint(params))
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
        self.fingerprints[before.names] = _Fingerprint(before.names, key, before.refs, before.value)


_STATES: weakref.WeakKeyDictionary[nn.Module, _ModelState] = weakref.WeakKeyDictionary()


def _state_of(model: nn.Module) -> _ModelState:
    try:
        return _STATES.setdefault(model, _ModelState())
    except TypeError:  # a module that cannot be hashed or weakly referenced: nothing is cached
        return _ModelState()


class AppliedPatch:
    """A patch applied in place; revert() restores the model bit for bit (also usable as a context manager).

    It holds views of the patched parameters: do not move the model to another device or dtype
    before reverting.
    """

    def __init__(self, state: _ModelState | None = None, fingerprint: _Fingerprint | None = None) -> None:
        # (flat view, positions or None for the whole tensor, the original entries)
        self._undo: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self._head: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._whole: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # small tensors: (flat, base copy)
        self._touched_base: dict[str, nn.Parameter] = {}
        self._written = _Written()
        self._state, self._fingerprint = state, fingerprint
        self._reverted = False

    def _seal(self) -> None:
        params = [*self._touched_base.values(), *(p for p, _ in self._head)]
        self._written = _Written((p, p._version, p.data_ptr()) for p in params)

    def _restore(self) -> None:
        with torch.no_grad():
            if self._whole[0]:
                torch._foreach_copy_(*self._whole)
            for flat, pos, original in reversed(self._undo):
                if pos is None:
                    flat.copy_(original)
                else:
                    # positions are unique; several times faster than index_copy_ on CPU
                    flat.scatter_(0, pos, original)
            for p, original in reversed(self._head):
                p.copy_(original)

    def revert(self) -> None:
        if self._reverted:
            raise DiffpruneError("this patch has already been reverted from the model")
        intact = self._written.unchanged()
        self._restore()
        self._reverted = True
        if self._state is not None:
            self._state.reverted(self, intact)

    def __enter__(self) -> AppliedPatch:
        return self

    def __exit__(self, *exc) -> None:
        if not self._reverted:
            self.revert()


def prepared_nbytes(patch: TaskPatch, model: nn.Module) -> int:
    """The memory that applying `patch` to `model` keeps between applies (0 before the first)."""
    state = _STATES.get(model)
    found = state.prepared.get(id(patch)) if state is not None else None
    return found[1].nbytes() if found is not None and found[0]() is patch else 0


def apply_patch(patch: TaskPatch, target: BaseModel | nn.Module, *, head: bool = True) -> AppliedPatch:
    """Apply `patch` to `target` in place after checking that its base weights are the patch's base.

    head=False changes the base only and leaves the model's head as it is: for serving, where
    every task brings a head of its own shape and runs it beside the model (diffprune.serving)."""
    if isinstance(target, BaseModel):
        model = target.model
    elif isinstance(target, nn.Module):
        model = target
    else:
        raise DiffpruneError(f"a patch applies to a BaseModel or a torch module, not a {type(target).__name__}")
    params = _named_parameters(model)
    base_params = _base_params(patch, params, target)
    state = _state_of(model)
    prepared = state.prepared_for(patch)
    problems = []
    if not _still_prepared(prepared, patch, params):
        prepared.clear()
        problems = _diff_problems(patch, params, base_params)
    _refuse_misfit(patch, problems + (_head_problems(patch, params, target) if head else []))
    if state.applied is not None and state.applied.unchanged():
        raise DiffpruneError(f"patch {patch._label()} cannot be applied: the model carries a patch applied "
                             "before and not reverted (revert that one first)")
    found = state.fingerprint(base_params)
    if found.value != patch.meta["fingerprint"]:
        raise DiffpruneError(
            f"patch {patch._label()} was made for base {patch.meta['fingerprint']} but the model's base weights"
            f" have fingerprint {found.value}: is it another base, or is a patch already applied to it?"
        )
    applied = AppliedPatch(state, found)
    _write(patch, params, applied, prepared, head)
    state.applied = applied._written
    return applied


def _named_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """dict(module.named_parameters()), the same names in the same order, in half its time (a
    serving switch pays this on every apply): shared parameters once, under their first name."""
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()

    def visit(prefix: str, m: nn.Module) -> None:
        for name, p in m._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                found[prefix + name] = p
        for name, child in m._modules.items():
            if child is not None:
                visit(f"{prefix}{name}.", child)

    visit("", module)
    return found


def _base_params(patch: TaskPatch, params: dict[str, nn.Parameter], target) -> dict[str, nn.Parameter]:
    """The parameters the fingerprint covers: a BaseModel's base parameters, or for a plain module
    every parameter except the patch's head tensors."""
    if not isinstance(target, BaseModel):
        return {n: p for n, p in params.items() if n not in patch.head}
    missing = next((n for n in target.base_names if n not in params), None)
    if missing is not None:
        raise DiffpruneError(f"the model no longer has its base parameter '{missing}' (was it wrapped since loading?)")
    return {n: params[n] for n in target.base_names}


def _still_prepared(prepared: _Prepared, patch: TaskPatch, params: dict[str, nn.Parameter]) -> bool:
    """Whether the entries prepared at an earlier apply still stand for this patch on these very
    parameters (then the fit was checked then, and nothing it depends on has changed)."""
    if len(prepared) != len(patch.diffs):
        return False
    return all(e.holds_for(params.get(n), patch.diffs.get(n)) for n, e in prepared.items())


def _diff_problems(patch: TaskPatch, params: dict, base_params: dict) -> list[str]:
    """Every changed tensor is a base parameter of the same shape, contiguous."""
    problems = []
    for name, d in patch.diffs.items():
        if name not in params:
            problems.append(f"changes '{name}', which the model does not have")
        elif name not in base_params:
            problems.append(f"changes '{name}', which is part of the model's head, not of its base")
        elif tuple(params[name].shape) != d.shape:
            problems.append(f"changes '{name}' of shape {d.shape} but the model's is {tuple(params[name].shape)}")
        elif not params[name].is_contiguous():
            problems.append(f"changes '{name}', which is not contiguous in the model's memory")
    return problems


def _head_problems(patch: TaskPatch, params: dict, target) -> list[str]:
    """The patch's head is the model's head, tensor for tensor and shape for shape."""
    problems = []
    for name, t in patch.head.items():
        if name not in params:
            problems.append(f"has head tensor '{name}', which the model does not have")
        elif isinstance(target, BaseModel) and name not in target.head_names:
            problems.append(f"has head tensor '{name}', which is a frozen base parameter of the model")
        elif tuple(params[name].shape) != tuple(t.shape):
            problems.append(f"has head tensor '{name}' of shape {tuple(t.shape)} but the model's is "
                            f"{tuple(params[name].shape)}")
    if isinstance(target, BaseModel):
        problems += [f"lacks the model's head tensor '{n}'" for n in sorted(target.head_names - set(patch.head))]
    return problems


def _refuse_misfit(patch: TaskPatch, problems: list[str]) -> None:
    if problems:
        extra = len(problems) - 1
        more = f" (and {extra} more mismatch{'es' if extra > 1 else ''})" if extra else ""
        raise DiffpruneError(f"patch {patch._label()} does not fit the model: it {problems[0]}{more}")


def _write(patch: TaskPatch, params: dict[str, nn.Parameter], applied: AppliedPatch, prepared: _Prepared,
           head: bool) -> None:
    state = applied._state or _ModelState()
    whole_flats, whole_values = applied._whole[0], []
    with torch.no_grad():
        try:
            for name, d in patch.diffs.items():
                e = prepared.get(name) or prepared.setdefault(name, _prepare(params[name], d, state, name, patch.meta["fingerprint"]))
                applied._touched_base[name] = e.param
                if e.whole:
                    whole_flats.append(e.flat)
                    whole_values.append(e.values)
                    applied._whole[1].append(e.originals)
                elif d.kind == SPARSE:
                    applied._undo.append((e.flat, None, e.flat.clone()))
                    e.flat.zero_()
                    e.flat.scatter_(0, e.positions, e.values)
                else:
                    # Revert copies the exact originals back: (a + b) - b is not always a.
                    applied._undo.append((e.flat, e.positions, e.originals))
                    if d.kind == ADD:
                        e.flat.scatter_(0, e.positions, e.values)  # base + diff, summed when prepared
                    else:
                        e.flat.index_fill_(0, e.positions, 0)
            if whole_flats:  # every small tensor in one call: a call per tensor costs more than its copy
                torch._foreach_copy_(whole_flats, whole_values)
            for name, t in (patch.head.items() if head else ()):
                p = params[name]
                applied._head.append((p, p.detach().clone()))
                p.copy_(t)
        except BaseException:
            applied._restore()  # never leave a half-patched model behind
            applied._reverted = True
            raise
    applied._seal()


# Tensors up to this size are written whole from a patched copy, all in one call.
WHOLE_NUMEL = 16384


def _prepare(p: nn.Parameter, d: SparseDiff, state: _ModelState, name: str, base: str) -> _Entry:
    """Called right after the fingerprint check (the model's base is `base`), so the entries
    read here are the base's."""
    flat = p.detach().view(-1)
    pos = d.positions.to(p.device)
    values = d.values.to(p.device, p.dtype)
    if d.kind != SPARSE and flat.numel() <= WHOLE_NUMEL:
        original = state.base_copy(name, p, base)
        patched = original.clone()
        if d.kind == ADD:
            patched.scatter_(0, pos, original.index_select(0, pos) + values)
        else:
            patched.index_fill_(0, pos, 0)
        return _Entry(p, p.data_ptr(), d, flat, pos, patched, original, whole=True)
    originals = None if d.kind == SPARSE else flat.index_select(0, pos)
    if d.kind == ADD:
        values = originals + values  # the very sum index_add_ would write, rounded the same way
    return _Entry(p, p.data_ptr(), d, flat, pos, values, originals)
