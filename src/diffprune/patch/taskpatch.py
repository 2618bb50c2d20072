"""The task patch: a task's sparse changes to the frozen base plus its dense head, in one file.

A patch holds, per changed base tensor, one `SparseDiff` of one kind (kinds.py: "add" a sparse
diff, "mask" entries switched off, "sparse" a pruned tensor that replaces the base's), the task
head (dense), and JSON metadata that binds it to its base by a weight fingerprint. The file
format is in format.py; applying, reverting and exporting in apply.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

import diffprune
from diffprune.errors import DiffpruneError
from diffprune.patch.apply import AppliedPatch, apply_patch
from diffprune.patch.export import export_model
from diffprune.patch.codec import choose_codec
from diffprune.patch.format import VALUE_DTYPES, read_patch, write_patch
from diffprune.patch.kinds import ADD, KINDS, SPARSE, SparseDiff

if TYPE_CHECKING:
    from diffprune.base import BaseModel

# Re-exported: code written against the single-module patch imports these from here.
__all__ = ["KINDS", "VALUE_DTYPES", "AppliedPatch", "SparseDiff", "TaskPatch", "export_model"]

# The meta fields that code reads back (apply, info, eval), with the types it relies on.
META_TYPES = {"base": (str, type(None)), "method": (str, type(None)), "task": (str, type(None)),
              "base_params": int, "num_labels": (int, type(None)), "labels": (list, type(None)),
              "problem_type": (str, type(None)), "head": (str, type(None)), "metrics": dict, "config": dict,
              "max_seq_length": (int, type(None))}


def _check_meta_types(meta: dict) -> None:
    for key, types in META_TYPES.items():
        if key in meta and (not isinstance(meta[key], types) or isinstance(meta[key], bool)):
            raise DiffpruneError(f"patch meta '{key}' is a {type(meta[key]).__name__}: {meta[key]!r}")
    if any(not isinstance(v, (int, float)) for v in meta.get("metrics", {}).values()):
        raise DiffpruneError("patch meta 'metrics' must map names to numbers")
    if any(not isinstance(v, str) for v in meta.get("labels") or []):
        raise DiffpruneError("patch meta 'labels' must be a list of strings")
    if meta.get("base_params", 0) < 0:
        raise DiffpruneError(f"patch meta 'base_params' is negative: {meta['base_params']}")


def _check_diff(name: str, d: object) -> None:
    if not isinstance(d, SparseDiff):
        raise DiffpruneError(f"diff '{name}' is a {type(d).__name__}, not a SparseDiff")
    p, expected = d.positions, d.nnz if d.stores_values else 0
    if d.values.numel() != expected:
        raise DiffpruneError(f"the '{d.kind}' change of '{name}' has {d.nnz} positions but {d.values.numel()} values")
    if d.nnz and (p[0] < 0 or p[-1] >= d.numel or bool((p[1:] <= p[:-1]).any())):
        raise DiffpruneError(f"diff '{name}' positions are not sorted unique indices below {d.numel}")
    if not bool(torch.isfinite(d.values).all()):
        raise DiffpruneError(f"the diff of '{name}' contains NaN or infinite values")


@dataclass
class TaskPatch:
    """diffs: base parameter name -> SparseDiff (one kind per tensor); head: dense head tensors;
    meta: JSON-able facts, at least the base's `fingerprint`.

    Build one with `from_dense_diffs` (add), `from_masks` (mask), `from_sparse_tensors` (sparse),
    `from_models` (add: a trained model against its base), or directly from SparseDiffs of any
    kinds: `TaskPatch({name: SparseDiff.from_mask(off), other: SparseDiff.from_dense(d)}, head, meta)`.
    """

    diffs: dict[str, SparseDiff]
    head: dict[str, torch.Tensor]
    meta: dict
    _path: Path | None = field(default=None, init=False, repr=False, compare=False)
    _bytes: int | None = field(default=None, init=False, repr=False, compare=False)
    _value_dtype: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.diffs = dict(self.diffs)
        for name, d in self.diffs.items():
            _check_diff(name, d)
        self.head = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in self.head.items()}
        if not all(bool(torch.isfinite(t).all()) for t in self.head.values()):
            raise DiffpruneError("a head tensor of the patch contains NaN or infinite values")
        both = sorted(set(self.diffs) & set(self.head))
        if both:
            raise DiffpruneError(f"'{both[0]}' is both a sparse diff and a head tensor of the patch")
        self.meta = dict(self.meta)
        if not isinstance(self.meta.get("fingerprint"), str) or not self.meta["fingerprint"]:
            raise DiffpruneError("patch meta needs the base model's 'fingerprint'")
        self.meta.setdefault("library_version", diffprune.__version__)
        self.meta.setdefault("base_params", sum(d.numel for d in self.diffs.values()))
        _check_meta_types(self.meta)
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as e:
            raise DiffpruneError(f"patch meta is not JSON serialisable: {e}") from e

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def from_models(cls, base_state: dict, task_state: dict, head: dict, meta: dict) -> TaskPatch:
        """An "add" patch: diff = task - base wherever they differ (exact comparison), for every
        name in base_state."""
        diffs = {}
        for name, b in base_state.items():
            if name not in task_state:
                raise DiffpruneError(f"the task model has no tensor '{name}' of the base")
            t = task_state[name].detach().to("cpu", torch.float32)
            b = b.detach().to("cpu", torch.float32)
            if t.shape != b.shape:
                raise DiffpruneError(
                    f"'{name}' has shape {tuple(b.shape)} in the base but {tuple(t.shape)} in the task model"
                )
            # With gradual underflow t != b implies t - b != 0, so every kept value is nonzero.
            changed = t != b
            positions = changed.reshape(-1).nonzero().squeeze(1)
            diffs[name] = SparseDiff(tuple(b.shape), positions, (t - b).reshape(-1)[positions], ADD)
        return cls._build(diffs, base_state, head, meta)

    @classmethod
    def from_dense_diffs(cls, diffs: dict[str, torch.Tensor], head: dict, meta: dict) -> TaskPatch:
        """An "add" patch from dense diffs {base parameter name: diff of its shape}: the nonzero
        entries of each diff are added to the base. Tensors whose diff is all zero are left out.
        `meta["base_params"]` defaults to the entries of all the tensors given."""
        return cls._build({n: SparseDiff.from_dense(d) for n, d in diffs.items()}, diffs, head, meta)

    @classmethod
    def from_masks(cls, masks: dict[str, torch.Tensor], head: dict, meta: dict) -> TaskPatch:
        """A "mask" patch from {base parameter name: bool tensor of its shape, True where the base
        entry is switched off}: applied, those entries become zero; no values are stored. Tensors
        with nothing switched off are left out. `meta["base_params"]` defaults to the entries of
        all the tensors given."""
        return cls._build({n: SparseDiff.from_mask(m) for n, m in masks.items()}, masks, head, meta)

    @classmethod
    def from_sparse_tensors(cls, tensors: dict[str, torch.Tensor], head: dict, meta: dict) -> TaskPatch:
        """A "sparse" patch from {base parameter name: the new dense tensor, whose zeros are the
        pruned entries}: applied, each base tensor is replaced by it (zero except at its nonzero
        entries, which the file stores with their values). Every tensor given is kept, even one
        that is all zero (that too replaces the base tensor). `meta["base_params"]` defaults to
        the entries of all the tensors given."""
        return cls._build({n: SparseDiff.from_sparse(t) for n, t in tensors.items()}, tensors, head, meta)

    @classmethod
    def _build(cls, diffs: dict[str, SparseDiff], all_tensors: dict, head: dict, meta: dict) -> TaskPatch:
        meta = dict(meta)
        meta.setdefault("base_params", sum(t.numel() for t in all_tensors.values()))
        # An add or mask change without positions changes nothing: a table row per tensor would
        # cost header bytes for nothing. An empty sparse change still zeroes its tensor.
        return cls({n: d for n, d in diffs.items() if d.nnz or d.kind == SPARSE}, head, meta)

    # -- reading ------------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        """Positions over all changes: added, switched off and kept entries."""
        return sum(d.nnz for d in self.diffs.values())

    @property
    def nnz_by_kind(self) -> dict[str, int]:
        """{kind: positions of that kind} for every kind in KINDS (0 where the patch has none)."""
        counts = dict.fromkeys(KINDS, 0)
        for d in self.diffs.values():
            counts[d.kind] += d.nnz
        return counts

    def dense_diff(self, name: str) -> torch.Tensor:
        """The dense diff of an "add" change (`diffs[name].to_dense()` gives any kind densely)."""
        if name not in self.diffs:
            raise DiffpruneError(f"the patch changes no entry of '{name}' (it changes {len(self.diffs)} tensors)")
        d = self.diffs[name]
        if d.kind != ADD:
            raise DiffpruneError(f"'{name}' is a '{d.kind}' change, not a diff: use patch.diffs[name].to_dense()")
        return d.to_dense()

    def _label(self) -> str:
        return f"'{self._path}'" if self._path else f"for task '{self.meta.get('task', '?')}'"

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, value_dtype: str = "float16") -> int:
        """Write the patch atomically (format version 2); returns the file size in bytes."""
        self._bytes = write_patch(path, self.diffs, self.head, self.meta, value_dtype)
        self._path, self._value_dtype = Path(path), value_dtype
        return self._bytes

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskPatch:
        """Read a patch file (format version 1 or 2). A version-2 file whose bytes differ from
        what was written is refused: its digest no longer matches."""
        path = Path(path)
        if not path.is_file():
            raise DiffpruneError(f"patch file '{path}' does not exist")
        try:
            diffs, head, meta, value_dtype = read_patch(path)
            patch = cls(diffs, head, meta)
        except DiffpruneError as e:
            raise DiffpruneError(f"'{path}' is not a valid diffprune patch: {e}") from e
        patch._path, patch._bytes, patch._value_dtype = path, path.stat().st_size, value_dtype
        return patch

    # -- the model -----------------------------------------------------------------------------
    def apply(self, target: BaseModel | nn.Module) -> AppliedPatch:
        """Apply the patch in place to `target`, a `BaseModel` (preferred: its head is checked
        against the patch's) or a plain torch module, after checking on the model itself that its
        base weights are those the patch was made for (their fingerprint, cached per model). A
        model that carries a patch already, or another base, is refused. Returns a handle whose
        `revert()` restores the model bit for bit (also a context manager). The cached
        fingerprint follows every change torch tracks; writes through `.data` or a numpy view
        are not tracked (apply.py)."""
        return apply_patch(self, target)

    def info(self) -> dict:
        """Everything about the patch, JSON-able: counts per kind, per tensor, sizes, meta."""
        tensors, pos_bytes = [], 0
        for name, d in self.diffs.items():
            codec, nbytes = choose_codec(d.numel, d.nnz)  # the same choice save() makes
            pos_bytes += nbytes
            tensors.append({"name": name, "kind": d.kind, "shape": list(d.shape), "nnz": d.nnz,
                            "density": d.nnz / max(d.numel, 1), "codec": codec, "position_bytes": nbytes})
        base_params = int(self.meta.get("base_params") or 0)
        return {
            "nnz": self.nnz,
            "nnz_by_kind": self.nnz_by_kind,
            "tensors_by_kind": {k: sum(d.kind == k for d in self.diffs.values()) for k in KINDS},
            "base_params": base_params,
            "density": self.nnz / base_params if base_params > 0 else None,
            "bytes": self._bytes,
            "path": str(self._path) if self._path else None,
            "value_dtype": self._value_dtype,
            "position_bytes": pos_bytes,
            "fingerprint": self.meta["fingerprint"],
            **{k: self.meta.get(k) for k in ("base", "method", "task", "labels", "num_labels", "problem_type",
                                             "max_seq_length", "metrics", "config")},
            "library_version": self.meta.get("library_version"),
            "head": [{"name": n, "shape": list(t.shape)} for n, t in self.head.items()],
            "tensors": tensors,
        }
