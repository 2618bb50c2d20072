"""Applying a patch to a model in place, reverting it bit for bit, and exporting base + patch.

`apply_patch` verifies the model it is given instead of trusting its caller: the base fingerprint
is computed on the model's own weights, so another base, or a base that already carries a patch
(its weights are no longer the base's), is refused.

Hashing MiniLM's 22.7M base weights takes ~120 ms, against ~1.5 ms for an apply and revert, so
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

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffprune.base import BaseModel, fingerprint
from diffprune.errors import DiffpruneError
from diffprune.io import atomic_dir
from diffprune.patch.kinds import ADD, SPARSE

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


class _ModelState:
    """What diffprune knows about one model between calls: cached fingerprints (one per set of
    base parameter names) and what the last apply not yet reverted wrote."""

    def __init__(self) -> None:
        self.fingerprints: dict[tuple[str, ...], _Fingerprint] = {}
        self.applied: _Written | None = None

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
        self._touched_base: dict[str, nn.Parameter] = {}
        self._written = _Written()
        self._state, self._fingerprint = state, fingerprint
        self._reverted = False

    def _seal(self) -> None:
        params = [*self._touched_base.values(), *(p for p, _ in self._head)]
        self._written = _Written((p, p._version, p.data_ptr()) for p in params)

    def _restore(self) -> None:
        with torch.no_grad():
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


def apply_patch(patch: TaskPatch, target: BaseModel | nn.Module) -> AppliedPatch:
    """Apply `patch` to `target` in place after checking that its base weights are the patch's base."""
    if isinstance(target, BaseModel):
        model = target.model
    elif isinstance(target, nn.Module):
        model = target
    else:
        raise DiffpruneError(f"a patch applies to a BaseModel or a torch module, not a {type(target).__name__}")
    params = dict(model.named_parameters())
    base_params = _base_params(patch, params, target)
    _check_fits(patch, params, base_params, target)
    state = _state_of(model)
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
    _write(patch, params, applied)
    state.applied = applied._written
    return applied


def _base_params(patch: TaskPatch, params: dict[str, nn.Parameter], target) -> dict[str, nn.Parameter]:
    """The parameters the fingerprint covers: a BaseModel's base parameters, or for a plain module
    every parameter except the patch's head tensors."""
    if not isinstance(target, BaseModel):
        return {n: p for n, p in params.items() if n not in patch.head}
    missing = next((n for n in target.base_names if n not in params), None)
    if missing is not None:
        raise DiffpruneError(f"the model no longer has its base parameter '{missing}' (was it wrapped since loading?)")
    return {n: params[n] for n in target.base_names}


def _check_fits(patch: TaskPatch, params: dict, base_params: dict, target) -> None:
    """Every changed tensor is a base parameter of the same shape; the head is the model's head."""
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
    if problems:
        extra = len(problems) - 1
        more = f" (and {extra} more mismatch{'es' if extra > 1 else ''})" if extra else ""
        raise DiffpruneError(f"patch {patch._label()} does not fit the model: it {problems[0]}{more}")


def _write(patch: TaskPatch, params: dict[str, nn.Parameter], applied: AppliedPatch) -> None:
    with torch.no_grad():
        try:
            for name, d in patch.diffs.items():
                p = params[name]
                flat = p.detach().view(-1)
                pos = d.positions.to(p.device, non_blocking=True)
                if d.kind == SPARSE:
                    applied._undo.append((flat, None, flat.clone()))
                    flat.zero_()
                    flat.scatter_(0, pos, d.values.to(p.device, p.dtype))
                else:
                    # Keep the exact originals: revert copies them back ((a + b) - b is not always a).
                    applied._undo.append((flat, pos, flat.index_select(0, pos)))
                    if d.kind == ADD:
                        flat.index_add_(0, pos, d.values.to(p.device, p.dtype))
                    else:
                        flat.index_fill_(0, pos, 0)
                applied._touched_base[name] = p
            for name, t in patch.head.items():
                p = params[name]
                applied._head.append((p, p.detach().clone()))
                p.copy_(t)
        except BaseException:
            applied._restore()  # never leave a half-patched model behind
            applied._reverted = True
            raise
    applied._seal()


def export_model(patch: TaskPatch, base: BaseModel, output_dir: str | os.PathLike) -> Path:
    """Write base+patch as a plain transformers model folder (loads with AutoModelForSequenceClassification):
    added diffs included, switched-off and pruned entries as zeros."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise DiffpruneError(f"{output_dir} exists and is not an empty folder; export writes a new model folder")
    config = base.model.config
    saved_labels = (config.id2label, config.label2id)
    labels = patch.meta.get("labels")
    with patch.apply(base):
        try:
            if labels and len(labels) == config.num_labels:  # name the outputs like the task does
                config.id2label = dict(enumerate(labels))
                config.label2id = {label: i for i, label in enumerate(labels)}
            with atomic_dir(output_dir) as tmp:
                base.model.save_pretrained(tmp)
                base.tokenizer.save_pretrained(tmp)
        finally:
            config.id2label, config.label2id = saved_labels
    return output_dir
