"""Applying a patch to a model in place and reverting it bit for bit (exporting: export.py).

`apply_patch` verifies the model it is given instead of trusting its caller: the base fingerprint
is computed on the model's own weights, so another base, or a base that already carries a patch
(its weights are no longer the base's), is refused. The fingerprint and what an apply
prepares are cached per model (model_state.py).

Serving switches tasks on every batch, so what an apply needs beyond the check is kept per model
and patch (`Prepared`). "add" changes on float32 CPU parameters are kept in the compact form
(compact.py; a CompactPatch from the task bank already is) and written by one numba call that
decodes every position, saves the entry there and adds the value; the revert is one call that
writes the saved entries back, so it restores the very bits ((a + b) - b is not always a) and
nothing but the compact form is kept between applies (the entries and positions an apply keeps
for its revert sit in buffers of the model's state, one patch being applied at a time). numba's
writes are invisible to torch, so each call bumps the version counters of the tensors it wrote,
as a torch write would.
The other changes (mask, sparse; add on other devices or dtypes) keep positions and values on
the parameters' device and dtype, and the base entries at the positions, read once. Those
entries are the base's because every apply checks the fingerprint first, and they are only
reused for the very parameter objects, at the same memory, that they were read from. An apply is
then one indexed write per tensor, a revert another; small tensors are copied whole from a
patched copy, all in one call (a call per tensor costs more than the copy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError
from diffprune.patch.compact import CompactDiffs, CompactPatch, kernels, powers_of_two
from diffprune.patch.kinds import ADD, SPARSE, SparseDiff
from diffprune.patch.model_state import Entry, Fingerprint, Flats, ModelState, Prepared, Written, state_of
from diffprune.sparse.kernel import kernel_threads, pool

if TYPE_CHECKING:
    from diffprune.patch.taskpatch import TaskPatch


class AppliedPatch:
    """A patch applied in place; revert() restores the model bit for bit (also usable as a context manager).

    It holds views of the patched parameters: do not move the model to another device or dtype
    before reverting.
    """

    def __init__(self, state: ModelState | None = None, fingerprint: Fingerprint | None = None) -> None:
        # (flat view, positions or None for the whole tensor, the original entries)
        self._undo: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self._head: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._whole: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # small tensors: (flat, base copy)
        # what the kernels wrote: (prepared, (entries, positions) kept, the split they ran on)
        self._compact: tuple[Prepared, tuple, tuple] | None = None
        self._touched_base: dict[str, nn.Parameter] = {}
        self._written = Written()
        self._state, self._fingerprint = state, fingerprint
        self._reverted = False

    def _seal(self) -> None:
        params = [*self._touched_base.values(), *(p for p, _ in self._head)]
        self._written = Written((p, p._version, p.data_ptr()) for p in params)

    def _restore(self) -> None:
        with torch.no_grad():
            if self._compact is not None:
                prepared, kept, (work, bounds) = self._compact
                if bounds.size == 2:
                    kernels().revert_add(prepared.flats.arrays, prepared.which, work, *kept)
                else:
                    with pool(bounds.size - 1):
                        kernels().revert_add_parallel(prepared.flats.arrays, prepared.which, work, bounds, *kept)
                torch.autograd.graph.increment_version(list(prepared.touched.values()))
                if self._state is not None:
                    self._state.give_back(kept)
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


def apply_patch(patch: TaskPatch | CompactPatch, target: BaseModel | nn.Module, *, head: bool = True) -> AppliedPatch:
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
    state = state_of(model)
    prepared = state.prepared_for(patch)
    flats = state.flats(params)
    problems = []
    if not _still_prepared(prepared, patch, params, flats):
        prepared.reset()
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
    if not prepared.sources:
        _plan(patch, prepared, flats)
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


def _changes(patch: TaskPatch | CompactPatch) -> dict[str, object]:
    """name -> the object whose identity stands for that change (a CompactPatch's whole form)."""
    if isinstance(patch, CompactPatch):
        return dict.fromkeys(patch.diffs.names, patch.diffs)
    return patch.diffs


def _still_prepared(prepared: Prepared, patch: TaskPatch | CompactPatch, params: dict[str, nn.Parameter],
                    flats: Flats) -> bool:
    """Whether what an earlier apply prepared still stands for this patch's very changes on these
    very parameters (then the fit was checked then, and nothing it depends on has changed)."""
    changes = _changes(patch)
    if prepared.sources.keys() != changes.keys() or any(prepared.sources[n] is not d for n, d in changes.items()):
        return False
    if prepared.compact is not None and prepared.flats is not flats:
        return False
    return all(e.holds_for(params.get(n)) for n, e in prepared.items())


def _diff_problems(patch: TaskPatch | CompactPatch, params: dict, base_params: dict) -> list[str]:
    """Every changed tensor is a base parameter of the same shape, contiguous."""
    problems = []
    shapes = patch.diffs.shapes_by_name() if isinstance(patch, CompactPatch) else {
        n: d.shape for n, d in patch.diffs.items()}
    for name, shape in shapes.items():
        if name not in params:
            problems.append(f"changes '{name}', which the model does not have")
        elif name not in base_params:
            problems.append(f"changes '{name}', which is part of the model's head, not of its base")
        elif tuple(params[name].shape) != shape:
            problems.append(f"changes '{name}' of shape {shape} but the model's is {tuple(params[name].shape)}")
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


def _plan(patch: TaskPatch | CompactPatch, prepared: Prepared, flats: Flats) -> None:
    """Which changes the compact kernels write (every "add" change on a parameter they can
    write, in one call) and which torch ops write, entry by entry (prepared on first use)."""
    prepared.sources = dict(_changes(patch))
    if isinstance(patch, CompactPatch):
        fits = all(n in flats.writable for n in patch.diffs.names)
        compact = patch.diffs if fits else None
        prepared.by_torch = {} if fits else patch.diffs.sparse_diffs()
    else:
        add = {n: d for n, d in patch.diffs.items() if d.kind == ADD and n in flats.writable}
        compact = CompactDiffs.of(add, torch.float16) if add else None  # float16 where that is exact
        prepared.own_compact = compact is not None
        prepared.by_torch = {n: d for n, d in patch.diffs.items() if n not in add}
    if compact is not None:
        prepared.compact, prepared.flats = compact, flats
        prepared.which = np.array([flats.index[n] for n in compact.names], np.int64)
        prepared.touched = {n: flats.params[flats.index[n]] for n in compact.names}


def _write_compact(prepared: Prepared, applied: AppliedPatch, state: ModelState) -> None:
    c = prepared.compact
    kept = state.take_buffers(c.nnz)
    work, bounds = _split(prepared, kernel_threads())
    if bounds.size == 2:
        kernels().apply_add(prepared.flats.arrays, prepared.which, c.stream, c.bits, c.code, powers_of_two(), work,
                            *kept)
    else:
        with pool(bounds.size - 1):
            kernels().apply_add_parallel(prepared.flats.arrays, prepared.which, c.stream, c.bits, c.code,
                                         powers_of_two(), work, bounds, *kept)
    torch.autograd.graph.increment_version(list(prepared.touched.values()))  # torch does not see numba write
    applied._compact = (prepared, kept, (work, bounds))
    applied._touched_base.update(prepared.touched)


# Below this many entries an apply runs on one thread. An apply is bound by the latency of its
# scattered reads of the weights, and a second core keeps as many more of them in flight; waking
# it costs about what it saves at ~2,000 entries (MiniLM, apply + revert on one and two threads:
# 2,339 entries 0.33 and 0.34 ms, 4,588 0.38 and 0.37, 9,138 0.43 and 0.40; measured).
PARALLEL_ENTRIES = 4096


def _split(prepared: Prepared, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """The compact changes cut into one run of entries per thread, found on first use."""
    threads = threads if prepared.compact.nnz >= PARALLEL_ENTRIES else 1
    if threads not in prepared.splits:
        prepared.splits[threads] = kernels().split(prepared.compact.stream, prepared.compact.table, threads)
    return prepared.splits[threads]


def _write(patch: TaskPatch | CompactPatch, params: dict[str, nn.Parameter], applied: AppliedPatch,
           prepared: Prepared, head: bool) -> None:
    state = applied._state or ModelState()
    whole_flats, whole_values = applied._whole[0], []
    with torch.no_grad():
        try:
            if prepared.compact is not None:
                _write_compact(prepared, applied, state)
            for name, d in prepared.by_torch.items():
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


def _prepare(p: nn.Parameter, d: SparseDiff, state: ModelState, name: str, base: str) -> Entry:
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
        return Entry(p, p.data_ptr(), d, flat, pos, patched, original, whole=True)
    originals = None if d.kind == SPARSE else flat.index_select(0, pos)
    if d.kind == ADD:
        values = originals + values  # the very sum index_add_ would write, rounded the same way
    return Entry(p, p.data_ptr(), d, flat, pos, values, originals)
