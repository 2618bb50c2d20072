"""The task patch: a task's sparse change to the frozen base plus its dense head, in one file.

File format (one safetensors file, never pickle):

* tensor `positions` (uint8): the coded positions (see codec.py) of every diff, concatenated;
* tensor `values` (float32 | float16 | bfloat16): every diff's values, concatenated in the same order;
* tensors `head.<name>` (float32): the dense task head;
* `__metadata__`: `format` = "diffprune.patch", `format_version` = "1", `tensors` = JSON list of
  [name, shape, nnz, codec, byte offset, byte length] (offsets into `positions`; values follow
  from the running sum of nnz), `meta` = the patch's JSON meta.

Everything is packed into two blobs rather than one safetensors entry per tensor because each
entry costs ~100 header bytes, which is noticeable next to a ~350 KB patch. Positions are decoded
once at load into int64 tensors, so applying a patch is one index_add_ per tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

import diffprune
from diffprune.errors import DiffpruneError, first_line
from diffprune.io import atomic_dir, atomic_path
from diffprune.patch.codec import choose_codec, decode_positions, encode_positions

if TYPE_CHECKING:
    from diffprune.base import BaseModel

FORMAT = "diffprune.patch"
FORMAT_VERSION = "1"
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SparseDiff:
    """The change to one base tensor: `values` added at flat `positions` (sorted, unique)."""

    shape: tuple[int, ...]
    positions: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        # Normalise once so apply() never converts: int64 / float32, flat, contiguous, on the CPU.
        self.shape = tuple(int(s) for s in self.shape)
        self.positions = torch.as_tensor(self.positions).detach().to("cpu", torch.int64).reshape(-1).contiguous()
        self.values = torch.as_tensor(self.values).detach().to("cpu", torch.float32).reshape(-1).contiguous()

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nnz(self) -> int:
        return self.positions.numel()


def _sparse(dense: torch.Tensor, mask: torch.Tensor) -> SparseDiff:
    flat_mask = mask.reshape(-1)
    positions = flat_mask.nonzero().squeeze(1)  # nonzero() returns sorted indices
    return SparseDiff(tuple(dense.shape), positions, dense.reshape(-1)[positions])


# The meta fields that code reads back (apply, info, eval), with the types it relies on.
META_TYPES = {"base": (str, type(None)), "method": (str, type(None)), "task": (str, type(None)),
              "base_params": int, "num_labels": (int, type(None)), "labels": (list, type(None)),
              "problem_type": (str, type(None)), "metrics": dict, "config": dict,
              "max_seq_length": (int, type(None))}


def _check_meta_types(meta: dict) -> None:
    for key, types in META_TYPES.items():
        if key in meta and (not isinstance(meta[key], types) or isinstance(meta[key], bool)):
            raise DiffpruneError(f"patch meta '{key}' is a {type(meta[key]).__name__}: {meta[key]!r}")
    if any(not isinstance(v, (int, float)) for v in meta.get("metrics", {}).values()):
        raise DiffpruneError("patch meta 'metrics' must map names to numbers")
    if any(not isinstance(v, str) for v in meta.get("labels") or []):
        raise DiffpruneError("patch meta 'labels' must be a list of strings")

@dataclass
class TaskPatch:
    """diffs: base parameter name -> SparseDiff; head: dense head tensors; meta: JSON-able facts."""

    diffs: dict[str, SparseDiff]
    head: dict[str, torch.Tensor]
    meta: dict
    _path: Path | None = field(default=None, init=False, repr=False, compare=False)
    _bytes: int | None = field(default=None, init=False, repr=False, compare=False)
    _value_dtype: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.diffs = dict(self.diffs)
        self.head = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in self.head.items()}
        for name, d in self.diffs.items():
            if not isinstance(d, SparseDiff):
                raise DiffpruneError(f"diff '{name}' is a {type(d).__name__}, not a SparseDiff")
            p = d.positions
            if d.values.numel() != d.nnz:
                raise DiffpruneError(f"diff '{name}' has {d.nnz} positions but {d.values.numel()} values")
            if d.nnz and (p[0] < 0 or p[-1] >= d.numel or bool((p[1:] <= p[:-1]).any())):
                raise DiffpruneError(f"diff '{name}' positions are not sorted unique indices below {d.numel}")
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

    @classmethod
    def from_models(cls, base_state: dict, task_state: dict, head: dict, meta: dict) -> TaskPatch:
        """diff = task - base wherever they differ (exact comparison), for every name in base_state."""
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
            diffs[name] = _sparse(t - b, t != b)
        return cls._build(diffs, base_state, head, meta)

    @classmethod
    def from_dense_diffs(cls, diffs: dict, head: dict, meta: dict) -> TaskPatch:
        """Keep the nonzero entries of each dense diff tensor."""
        dense = {n: d.detach().to("cpu", torch.float32) for n, d in diffs.items()}
        return cls._build({n: _sparse(d, d != 0) for n, d in dense.items()}, diffs, head, meta)

    @classmethod
    def _build(cls, diffs: dict, all_tensors: dict, head: dict, meta: dict) -> TaskPatch:
        bad = next((n for n, d in diffs.items() if not torch.isfinite(d.values).all()), None)
        if bad is not None:
            raise DiffpruneError(f"the diff of '{bad}' contains NaN or infinite values")
        meta = dict(meta)
        meta.setdefault("base_params", sum(t.numel() for t in all_tensors.values()))
        # Untouched tensors are left out: a table row per tensor would cost header bytes for nothing.
        return cls({n: d for n, d in diffs.items() if d.nnz}, head, meta)

    @property
    def nnz(self) -> int:
        return sum(d.nnz for d in self.diffs.values())

    def dense_diff(self, name: str) -> torch.Tensor:
        if name not in self.diffs:
            raise DiffpruneError(f"the patch changes no entry of '{name}' (it changes {len(self.diffs)} tensors)")
        d = self.diffs[name]
        dense = torch.zeros(d.numel, dtype=torch.float32)
        dense[d.positions] = d.values
        return dense.reshape(d.shape)

    def _label(self) -> str:
        return f"'{self._path}'" if self._path else f"for task '{self.meta.get('task', '?')}'"

    def save(self, path: str | os.PathLike, value_dtype: str = "float16") -> int:
        """Write the patch atomically; returns the file size in bytes."""
        from safetensors.torch import save_file

        if value_dtype not in VALUE_DTYPES:
            raise DiffpruneError(f"value dtype must be one of {', '.join(VALUE_DTYPES)}, not '{value_dtype}'")
        values = torch.cat([d.values for d in self.diffs.values()]) if self.diffs else torch.zeros(0)
        stored = values.to(VALUE_DTYPES[value_dtype])
        if not torch.isfinite(stored).all():
            raise DiffpruneError(
                f"some diff values overflow {value_dtype}; save with value_dtype='float32' or 'bfloat16'"
            )
        table, blobs, offset = [], [], 0
        for name, d in self.diffs.items():
            codec, data = encode_positions(d.positions.numpy(), d.numel)
            table.append([name, list(d.shape), d.nnz, codec, offset, int(data.size)])
            blobs.append(data)
            offset += data.size
        positions = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)
        tensors = {"positions": torch.from_numpy(positions), "values": stored.contiguous()}
        tensors.update({f"head.{n}": t for n, t in self.head.items()})
        compact = {"separators": (",", ":")}  # the header counts in the file size
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tensors": json.dumps(table, **compact),
            "meta": json.dumps(self.meta, **compact),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        self._path, self._value_dtype = Path(path), value_dtype
        self._bytes = Path(path).stat().st_size
        return self._bytes

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskPatch:
        path = Path(path)
        if not path.is_file():
            raise DiffpruneError(f"patch file '{path}' does not exist")
        try:
            patch = cls._parse(path)
        except DiffpruneError as e:
            raise DiffpruneError(f"'{path}' is not a valid diffprune patch: {e}") from e
        patch._path, patch._bytes = path, path.stat().st_size
        return patch

    @classmethod
    def _parse(cls, path: Path) -> TaskPatch:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("format") != FORMAT:
                    raise DiffpruneError(f"its format is {md.get('format')!r}, not '{FORMAT}'")
                if md.get("format_version") != FORMAT_VERSION:
                    raise DiffpruneError(
                        f"format version {md.get('format_version')!r}; this diffprune reads version {FORMAT_VERSION}"
                    )
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except DiffpruneError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated / garbage files
            raise DiffpruneError(f"cannot read it as safetensors ({first_line(e)})") from e
        try:
            table, meta = json.loads(md["tensors"]), json.loads(md["meta"])
        except (KeyError, ValueError) as e:
            raise DiffpruneError(f"its tensor table or meta is missing or not JSON ({e})") from e
        positions, values = tensors.pop("positions", None), tensors.pop("values", None)
        if positions is None or positions.dtype != torch.uint8 or positions.dim() != 1:
            raise DiffpruneError("it has no one-dimensional uint8 'positions' tensor")
        value_dtype = next((k for k, v in VALUE_DTYPES.items() if values is not None and values.dtype == v), None)
        if value_dtype is None or values.dim() != 1:
            raise DiffpruneError("it has no one-dimensional float 'values' tensor")
        if not isinstance(table, list) or not isinstance(meta, dict):
            raise DiffpruneError("its tensor table is not a list or its meta not an object")
        pos_np, diffs, pos_end, val_end = positions.numpy(), {}, 0, 0
        for row in table:
            name, shape, nnz, codec, offset, length = _check_row(row)
            if offset != pos_end or name in diffs:
                raise DiffpruneError(f"table row for '{name}' is out of order or repeated")
            numel = int(np.prod(shape, dtype=np.int64))
            try:
                decoded = decode_positions(codec, pos_np[offset : offset + length], numel, nnz)
            except DiffpruneError as e:
                raise DiffpruneError(f"positions of '{name}': {e}") from e
            pos_end, val_end = offset + length, val_end + nnz
            if val_end > values.numel():
                raise DiffpruneError(f"the values end before those of '{name}'")
            diffs[name] = SparseDiff(tuple(shape), torch.from_numpy(decoded), values[val_end - nnz : val_end])
        if pos_end != positions.numel() or val_end != values.numel():
            raise DiffpruneError(
                f"the table covers {pos_end} of {positions.numel()} position bytes"
                f" and {val_end} of {values.numel()} values"
            )
        stray = next((k for k in tensors if not k.startswith("head.")), None)
        if stray is not None:
            raise DiffpruneError(f"it has an unexpected tensor '{stray}'")
        head = {k[len("head.") :]: t for k, t in tensors.items()}
        if any(not t.is_floating_point() for t in head.values()):
            raise DiffpruneError("a head tensor is not floating point")
        if not all(bool(torch.isfinite(t).all()) for t in [values, *head.values()]):
            raise DiffpruneError("it holds values that are not finite (NaN or inf)")
        patch = cls(diffs, head, meta)
        patch._value_dtype = value_dtype
        return patch

    def apply(self, model: nn.Module, fingerprint: str) -> AppliedPatch:
        """Add the diffs and copy the head into `model` in place; the result can revert it exactly."""
        if fingerprint != self.meta["fingerprint"]:
            raise DiffpruneError(
                f"patch {self._label()} was made for base {self.meta['fingerprint']}"
                f" but the model's base is {fingerprint}"
            )
        params = dict(model.named_parameters())
        problems = []
        for kind, tensors in (("changes", {n: d.shape for n, d in self.diffs.items()}),
                              ("has head tensor", {n: tuple(t.shape) for n, t in self.head.items()})):
            for name, shape in tensors.items():
                if name not in params:
                    problems.append(f"{kind} '{name}', which the model does not have")
                elif tuple(params[name].shape) != shape:
                    problems.append(f"{kind} '{name}' of shape {shape} but the model's is {tuple(params[name].shape)}")
        if problems:
            extra = len(problems) - 1
            more = f" (and {extra} more mismatch{'es' if extra > 1 else ''})" if extra else ""
            raise DiffpruneError(f"patch {self._label()} does not fit the model: it {problems[0]}{more}")
        applied = AppliedPatch()
        with torch.no_grad():
            try:
                for name, d in self.diffs.items():
                    p = params[name]
                    flat = p.detach().view(-1)
                    pos = d.positions.to(p.device, non_blocking=True)
                    # Keep the exact originals: revert copies them back ((a + b) - b is not always a).
                    applied._diffs.append((flat, pos, flat.index_select(0, pos)))
                    flat.index_add_(0, pos, d.values.to(p.device, p.dtype))
                for name, t in self.head.items():
                    p = params[name]
                    applied._head.append((p, p.detach().clone()))
                    p.copy_(t)
            except BaseException:
                applied.revert()  # never leave a half-patched model behind
                raise
        return applied

    def info(self) -> dict:
        tensors, pos_bytes = [], 0
        for name, d in self.diffs.items():
            codec, nbytes = choose_codec(d.numel, d.nnz)  # the same choice save() makes
            pos_bytes += nbytes
            tensors.append({"name": name, "shape": list(d.shape), "nnz": d.nnz, "density": d.nnz / max(d.numel, 1),
                            "codec": codec, "position_bytes": nbytes})
        base_params = int(self.meta.get("base_params") or 0)
        return {
            "nnz": self.nnz,
            "base_params": base_params,
            "density": self.nnz / base_params if base_params else None,
            "bytes": self._bytes,
            "path": str(self._path) if self._path else None,
            "value_dtype": self._value_dtype,
            "position_bytes": pos_bytes,
            "fingerprint": self.meta["fingerprint"],
            **{k: self.meta.get(k) for k in ("base", "method", "task", "labels", "num_labels", "metrics")},
            "library_version": self.meta.get("library_version"),
            "head": [{"name": n, "shape": list(t.shape)} for n, t in self.head.items()],
            "tensors": tensors,
        }


def _check_row(row) -> tuple:
    ok = (isinstance(row, list) and len(row) == 6 and isinstance(row[0], str) and isinstance(row[1], list)
          and all(type(v) is int and v >= 0 for v in (*row[1], row[2], row[4], row[5])) and isinstance(row[3], str))
    if not ok:
        raise DiffpruneError(f"malformed tensor table row {str(row)[:80]}")
    return row[0], tuple(row[1]), row[2], row[3], row[4], row[5]


class AppliedPatch:
    """A patch applied in place; revert() restores the model bit for bit (also usable as a context manager).

    It holds views of the patched parameters: do not move the model to another device or dtype
    before reverting.
    """

    def __init__(self) -> None:
        self._diffs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._head: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._reverted = False

    def revert(self) -> None:
        if self._reverted:
            raise DiffpruneError("this patch has already been reverted from the model")
        with torch.no_grad():
            for flat, pos, original in reversed(self._diffs):
                flat.scatter_(0, pos, original)  # positions are unique; several times faster than index_copy_ on CPU
            for p, original in reversed(self._head):
                p.copy_(original)
        self._reverted = True

    def __enter__(self) -> AppliedPatch:
        return self

    def __exit__(self, *exc) -> None:
        if not self._reverted:
            self.revert()


def export_model(patch: TaskPatch, base: BaseModel, output_dir: str | os.PathLike) -> Path:
    """Write base+patch as a plain transformers model folder (loads with AutoModelForSequenceClassification)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise DiffpruneError(f"{output_dir} exists and is not an empty folder; export writes a new model folder")
    config = base.model.config
    saved_labels = (config.id2label, config.label2id)
    labels = patch.meta.get("labels")
    with patch.apply(base.model, base.fingerprint):
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
