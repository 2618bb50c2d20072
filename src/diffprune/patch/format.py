"""Reading and writing task patch files: one safetensors file, never pickle.

Format version 2:

* tensor `positions` (uint8): the coded positions (see codec.py) of every changed tensor, concatenated;
* tensor `values` (float32 | float16 | bfloat16): the values of every "add" and "sparse" change,
  concatenated in table order ("mask" changes store none);
* tensors `head.<name>` (float32): the dense task head;
* `__metadata__`: `format` = "diffprune.patch", `format_version` = "2", `value_dtype` = the values'
  dtype, `tensors` = JSON list of [name, shape, nnz, codec, byte offset, byte length, kind]
  (offsets into `positions`; values follow from the running sum of the value counts),
  `meta` = the patch's JSON meta, and `digest` = "sha256:<hex>" over every stored byte that
  matters (see `digest`).

The digest is what makes a damaged or edited file fail to load instead of silently changing the
model: every code and value byte decodes to *some* valid patch (Elias-Fano low bits are stored
verbatim, a flipped value bit is another number), and header edits (rows swapped onto tensors
of the same shape, the values' dtype F16 read as BF16) keep the file well formed. It guards
against damage, not against a forger, who can recompute it.

Version 1 (no digest, no `value_dtype`, rows of six fields, every change "add") is still read.

Everything is packed into two blobs rather than one safetensors entry per tensor because each
entry costs ~100 header bytes, which is noticeable next to a ~350 KB patch. Positions are decoded
once at load into int64 tensors, so applying a patch is one indexed write per tensor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from diffprune.errors import DiffpruneError, first_line
from diffprune.io import atomic_path
from diffprune.patch.codec import decode_positions, encode_positions
from diffprune.patch.kinds import ADD, MASK, SparseDiff, check_kind

FORMAT = "diffprune.patch"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The metadata strings the digest covers, in the order it reads them.
DIGESTED_FIELDS = ("format", "format_version", "value_dtype", "tensors", "meta")


def digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata fields that matter and each tensor's name, dtype, shape and bytes.

    Every field is length-prefixed, so no two different files hash the same sequence of bytes.
    """
    h = hashlib.sha256()

    def put(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for key in DIGESTED_FIELDS:
        put(key.encode())
        put(metadata.get(key, "").encode())
    for name in sorted(tensors):
        t = tensors[name]
        put(name.encode())
        put(str(t.dtype).encode())
        put(json.dumps(list(t.shape)).encode())
        put(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def write_patch(path: str | Path, diffs: dict[str, SparseDiff], head: dict[str, torch.Tensor], meta: dict,
                value_dtype: str) -> int:
    """Write a version-2 patch file atomically; returns its size in bytes."""
    from safetensors.torch import save_file

    if value_dtype not in VALUE_DTYPES:
        raise DiffpruneError(f"value dtype must be one of {', '.join(VALUE_DTYPES)}, not '{value_dtype}'")
    with_values = [d.values for d in diffs.values() if d.stores_values]
    values = torch.cat(with_values) if with_values else torch.zeros(0)
    stored = values.to(VALUE_DTYPES[value_dtype])
    if not torch.isfinite(stored).all():
        raise DiffpruneError(
            f"some diff values overflow {value_dtype}; save with value_dtype='float32' or 'bfloat16'"
        )
    table, blobs, offset = [], [], 0
    for name, d in diffs.items():
        codec, data = encode_positions(d.positions.numpy(), d.numel)
        table.append([name, list(d.shape), d.nnz, codec, offset, int(data.size), d.kind])
        blobs.append(data)
        offset += data.size
    positions = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)
    tensors = {"positions": torch.from_numpy(positions), "values": stored.contiguous()}
    tensors.update({f"head.{n}": t for n, t in head.items()})
    compact = {"separators": (",", ":")}  # the header counts in the file size
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "value_dtype": value_dtype,
        "tensors": json.dumps(table, **compact),
        "meta": json.dumps(meta, **compact),
    }
    metadata["digest"] = digest(metadata, tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path).stat().st_size


def read_patch(path: Path) -> tuple[dict[str, SparseDiff], dict[str, torch.Tensor], dict, str]:
    """(diffs, head, meta, value dtype name) of a patch file of any readable version; raises a
    one-line DiffpruneError (without the path: the caller names the file) if it is not valid."""
    metadata, tensors = _read_safetensors(path)
    version = _check_header(metadata, tensors)
    try:
        table, meta = json.loads(metadata["tensors"]), json.loads(metadata["meta"])
    except (KeyError, ValueError) as e:
        raise DiffpruneError(f"its tensor table or meta is missing or not JSON ({first_line(e)})") from e
    if not isinstance(table, list) or not isinstance(meta, dict):
        raise DiffpruneError("its tensor table is not a list or its meta not an object")
    positions, values = tensors.pop("positions", None), tensors.pop("values", None)
    if positions is None or positions.dtype != torch.uint8 or positions.dim() != 1:
        raise DiffpruneError("it has no one-dimensional uint8 'positions' tensor")
    value_dtype = _value_dtype(metadata, values, version)
    diffs = _decode_table(table, positions, values, version)
    stray = next((k for k in tensors if not k.startswith("head.")), None)
    if stray is not None:
        raise DiffpruneError(f"it has an unexpected tensor '{stray}'")
    head = {k[len("head.") :]: t for k, t in tensors.items()}
    if any(not t.is_floating_point() for t in head.values()):
        raise DiffpruneError("a head tensor is not floating point")
    if not all(bool(torch.isfinite(t).all()) for t in [values, *head.values()]):
        raise DiffpruneError("it holds values that are not finite (NaN or inf)")
    return diffs, head, meta, value_dtype


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise DiffpruneError(f"its format is {metadata.get('format')!r}, not '{FORMAT}'")
            return metadata, {k: f.get_tensor(k) for k in f.keys()}
    except DiffpruneError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated / garbage files
        raise DiffpruneError(f"cannot read it as safetensors ({first_line(e)})") from e


def _check_header(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """The file's format version, once its digest (version 2) has been checked."""
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise DiffpruneError(
            f"format version {version!r}; this diffprune reads versions {', '.join(READABLE_VERSIONS)}"
        )
    if version == "1":
        # A version-1 writer never wrote these: a file that has them is a damaged version-2 file.
        if "digest" in metadata or "value_dtype" in metadata:
            raise DiffpruneError("it says format version 1 but carries a version-2 digest or value dtype")
        return version
    recorded = metadata.get("digest")
    if not isinstance(recorded, str) or not recorded.startswith("sha256:"):
        raise DiffpruneError("it has no digest of its contents (format version 2 records one)")
    if digest(metadata, tensors) != recorded:
        raise DiffpruneError(
            "its contents do not match the digest recorded in it: the file was changed or damaged"
        )
    return version


def _value_dtype(metadata: dict[str, str], values: torch.Tensor | None, version: str) -> str:
    if values is None or values.dim() != 1:
        raise DiffpruneError("it has no one-dimensional 'values' tensor")
    found = next((k for k, v in VALUE_DTYPES.items() if values.dtype == v), None)
    if found is None:
        raise DiffpruneError(f"its values are {values.dtype}, not one of {', '.join(VALUE_DTYPES)}")
    recorded = metadata.get("value_dtype") if version != "1" else found
    if recorded != found:
        raise DiffpruneError(f"its values are stored as {found} but its header records {recorded!r}")
    return found


def _decode_table(table: list, positions: torch.Tensor, values: torch.Tensor, version: str) -> dict[str, SparseDiff]:
    pos_np, diffs, pos_end, val_end = positions.numpy(), {}, 0, 0
    for row in table:
        name, shape, nnz, codec, offset, length, kind = _check_row(row, version)
        if offset != pos_end or name in diffs:
            raise DiffpruneError(f"table row for '{name}' is out of order or repeated")
        numel = int(np.prod(shape, dtype=np.int64))
        try:
            decoded = decode_positions(codec, pos_np[offset : offset + length], numel, nnz)
        except DiffpruneError as e:
            raise DiffpruneError(f"positions of '{name}': {e}") from e
        pos_end = offset + length
        count = 0 if kind == MASK else nnz
        val_end += count
        if val_end > values.numel():
            raise DiffpruneError(f"the values end before those of '{name}'")
        diffs[name] = SparseDiff(shape, torch.from_numpy(decoded), values[val_end - count : val_end], kind)
    if pos_end != positions.numel() or val_end != values.numel():
        raise DiffpruneError(
            f"the table covers {pos_end} of {positions.numel()} position bytes"
            f" and {val_end} of {values.numel()} values"
        )
    return diffs


def _check_row(row: object, version: str) -> tuple:
    """A table row's fields: [name, shape, nnz, codec, offset, length] plus the kind in version 2."""
    fields = 6 if version == "1" else 7
    ok = (isinstance(row, list) and len(row) == fields and isinstance(row[0], str) and isinstance(row[1], list)
          and all(type(v) is int and v >= 0 for v in (*row[1], row[2], row[4], row[5])) and isinstance(row[3], str))
    if not ok:
        raise DiffpruneError(f"malformed tensor table row {str(row)[:80]}")
    kind = ADD if version == "1" else row[6]
    try:
        check_kind(kind)
    except DiffpruneError as e:
        raise DiffpruneError(f"table row for '{row[0]}': {e}") from e
    return row[0], tuple(row[1]), row[2], row[3], row[4], row[5], kind
