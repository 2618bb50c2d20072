"""The compact in-memory form of a patch's "add" changes, read directly by every kernel that
serves them: switching's apply and revert (apply.py) and mixed-task batches (serving/kernel.py).

A served task costs its patch file's size in memory, not several times it: a position is a gap
varint (about 1.5 bytes at 0.5% density, against 4 or 8 as an integer; compact_kernels.py has
the coding), a value keeps the dtype the file stored it in (2 bytes for fp16 / bf16), and every
tensor's changes sit in the same three arrays, so one kernel call serves a whole patch. Tensors
that are looked up by row (embeddings) also keep checkpoints, every CHECK_ROWS rows, where
decoding may start; the rest are only ever read whole, first to last.

The form is exact: `sparse_diffs()` gives back the SparseDiffs it was built from, bit for bit
(values that the requested dtype would round are kept as float32 instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from diffprune.errors import DiffpruneError
from diffprune.patch.kinds import ADD, SparseDiff

# Rows of a looked-up tensor between checkpoints: a lookup decodes about this many rows' entries.
CHECK_ROWS = 64
CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # compact_kernels' value codes
_POW2: np.ndarray | None = None


def powers_of_two() -> np.ndarray:
    """(2, 256) float32: the scale of a 16-bit value of each biased exponent, fp16 (row 0:
    2^(e - 25), exponents 0 and 1 alike) and bf16 (row 1: 2^(e - 134)); see compact_kernels.widen."""
    global _POW2
    if _POW2 is None:
        e = np.maximum(np.arange(256), 1)
        _POW2 = np.stack([np.ldexp(np.float32(1), np.minimum(e - 25, 127)),
                          np.ldexp(np.float32(1), e - 134)]).astype(np.float32)
    return _POW2


def kernels():
    from diffprune.patch import compact_kernels  # numba's import costs a second: only when used

    return compact_kernels


@dataclass(eq=False)
class CompactDiffs:
    """Every "add" change of one patch. Tensor t (`names[t]`, `shapes[t]`) has table[t] =
    (first byte in `stream`, first entry in `bits`, entries, first checkpoint row, positions
    per checkpoint or 0); entry e's value is bits[e] read as `value_dtype` (float32: the pair
    bits[2e : 2e + 2])."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    stream: np.ndarray  # uint8: every tensor's gap varints, one padding byte at the end
    bits: np.ndarray  # uint16
    value_dtype: torch.dtype
    table: np.ndarray  # int64 (tensors, 5)
    checks: np.ndarray  # int64 (checkpoints, 3): byte, entry, previous position
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {n: t for t, n in enumerate(self.names)}

    @classmethod
    def of(cls, diffs: dict[str, SparseDiff], value_dtype: torch.dtype = torch.float16,
           looked_up: set[str] | frozenset = frozenset()) -> CompactDiffs:
        """The compact form of `diffs` (all "add"); values in `value_dtype` where every value
        keeps its bits there, float32 otherwise; checkpoints for the tensors in `looked_up`."""
        if value_dtype not in CODES:
            raise DiffpruneError(f"compact values are float16, bfloat16 or float32, not {value_dtype}")
        k = kernels()
        names, shapes, streams, values, rows, checks = [], [], [], [], [], []
        byte = entry = check = 0
        for name, d in diffs.items():
            if d.kind != ADD:
                raise DiffpruneError(f"the change of '{name}' is '{d.kind}': only 'add' changes are kept compact")
            positions = d.positions.numpy()
            stream = k.encode(positions)[:-1]  # the padding byte once, after every tensor
            block = CHECK_ROWS * d.shape[-1] if name in looked_up and d.shape else 0
            ck = k.checkpoints(positions, stream, 0, block) if block else np.zeros((0, 3), np.int64)
            checks.append(ck + np.array([byte, entry, 0]))
            rows.append((byte, entry, d.nnz, check, block))
            names.append(name), shapes.append(d.shape), streams.append(stream), values.append(d.values)
            byte, entry, check = byte + stream.size, entry + d.nnz, check + len(ck)
        flat = torch.cat(values) if values else torch.zeros(0)
        if not torch.equal(flat.to(value_dtype).float(), flat):
            value_dtype = torch.float32  # never round: keep what the patch holds
        bits = flat.to(value_dtype).contiguous().view(torch.int16 if value_dtype != torch.float32 else torch.float32)
        return cls(names, shapes, np.concatenate([*streams, np.zeros(1, np.uint8)]),
                   bits.numpy().view(np.uint16).copy(), value_dtype,
                   np.array(rows, np.int64).reshape(-1, 5), np.concatenate([np.zeros((0, 3), np.int64), *checks]))

    @property
    def code(self) -> int:
        return CODES[self.value_dtype]

    @property
    def nnz(self) -> int:
        return int(self.table[:, 2].sum())

    @property
    def nbytes(self) -> int:
        return self.stream.nbytes + self.bits.nbytes + self.table.nbytes + self.checks.nbytes

    def checkpointed(self, name: str) -> bool:
        """Whether the tensor can be read by row: it has checkpoints, or nothing to read."""
        _, _, nnz, _, block = self.table[self.index[name]]
        return bool(block) or not nnz

    def kinds(self) -> dict[str, str]:
        return dict.fromkeys(self.names, ADD)

    def shapes_by_name(self) -> dict[str, tuple[int, ...]]:
        return dict(zip(self.names, self.shapes))

    def positions(self, t: int) -> np.ndarray:
        byte, _, nnz, _, _ = self.table[t]
        return kernels().decode(self.stream, byte, nnz)

    def values(self, t: int) -> torch.Tensor:
        _, entry, nnz, _, _ = self.table[t]
        if self.value_dtype == torch.float32:
            return torch.from_numpy(self.bits.view(np.float32)[entry: entry + nnz].copy())
        bits = self.bits[entry: entry + nnz]
        if self.value_dtype == torch.float16:
            return torch.from_numpy(bits.view(np.float16).astype(np.float32))
        return torch.from_numpy((bits.astype(np.uint32) << 16).view(np.float32))

    def sparse_diff(self, name: str) -> SparseDiff:
        t = self.index[name]
        return SparseDiff(self.shapes[t], torch.from_numpy(self.positions(t)), self.values(t), ADD)

    def sparse_diffs(self) -> dict[str, SparseDiff]:
        """The SparseDiffs this form was built from, bit for bit."""
        return {n: self.sparse_diff(n) for n in self.names}


@dataclass(eq=False)
class CompactPatch:
    """A patch of "add" changes only, kept compact: what the task bank holds for a task that
    mixed batches serve, applied for switching by `apply_patch` like a TaskPatch."""

    diffs: CompactDiffs
    head: dict[str, torch.Tensor]
    meta: dict
    name: str = "?"

    def _label(self) -> str:
        return f"of task '{self.name}'"
