"""The kinds of change a patch makes to one base tensor, and `SparseDiff`, which holds one.

Every method learns a patch of one of three kinds per base tensor (DESIGN.md, "One idea"):

* "add": a sparse diff (diff pruning): `values` are added to the base entries at `positions`;
* "mask": base entries switched off (adapting by pruning): the entries at `positions` become
  zero, and no values are stored;
* "sparse": a sparse model (pruning at distilling): the tensor is replaced, zero everywhere
  except at `positions`, which hold `values`.

Positions are flat (row-major) indices into the tensor, sorted and unique, so that every kind is
stored with the same position codecs and applied with one indexed write per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffprune.errors import DiffpruneError

KINDS = ("add", "mask", "sparse")
ADD, MASK, SPARSE = KINDS
# What each kind does to the entries at its positions, in words, for `patch info` and the plot.
KIND_WORDS = {ADD: "changed", MASK: "switched off", SPARSE: "kept (the rest of the tensor zero)"}


def check_kind(kind: object) -> str:
    if kind not in KINDS:
        raise DiffpruneError(f"unknown patch kind {kind!r} (this diffprune knows {', '.join(KINDS)})")
    return kind


@dataclass
class SparseDiff:
    """The change to one base tensor of shape `shape`, at flat `positions` (sorted, unique).

    `kind` is one of KINDS: "add" adds `values` at the positions; "mask" sets the entries at the
    positions to zero and has no values (`values` is then an empty float32 tensor: pass None or
    an empty tensor); "sparse" makes the tensor zero except at the positions, which hold `values`.
    Build one from dense tensors with `from_dense` (add), `from_mask` (mask) or `from_sparse`
    (sparse); the positions and values are checked when a TaskPatch is made of them.
    """

    shape: tuple[int, ...]
    positions: torch.Tensor
    values: torch.Tensor | None = None
    kind: str = ADD

    def __post_init__(self) -> None:
        check_kind(self.kind)
        # Normalise once so apply() never converts: int64 / float32, flat, contiguous, on the CPU.
        self.shape = tuple(int(s) for s in self.shape)
        self.positions = torch.as_tensor(self.positions).detach().to("cpu", torch.int64).reshape(-1).contiguous()
        if self.values is None:
            if self.kind != MASK:
                raise DiffpruneError(f"a '{self.kind}' change needs values (only a mask has none)")
            self.values = torch.zeros(0)
        self.values = torch.as_tensor(self.values).detach().to("cpu", torch.float32).reshape(-1).contiguous()

    @classmethod
    def from_dense(cls, diff: torch.Tensor) -> SparseDiff:
        """An "add" change from a dense diff: its nonzero entries, to be added to the base tensor."""
        diff = diff.detach().to("cpu", torch.float32)
        positions = _flat_nonzero(diff != 0)
        return cls(tuple(diff.shape), positions, diff.reshape(-1)[positions], ADD)

    @classmethod
    def from_mask(cls, off: torch.Tensor) -> SparseDiff:
        """A "mask" change from a bool tensor of the base tensor's shape: True switches an entry off."""
        if off.dtype != torch.bool:
            raise DiffpruneError(f"a mask must be a bool tensor (True = switched off), not {off.dtype}")
        return cls(tuple(off.shape), _flat_nonzero(off.detach().to("cpu")), None, MASK)

    @classmethod
    def from_sparse(cls, tensor: torch.Tensor) -> SparseDiff:
        """A "sparse" change from a pruned tensor: its zeros (of either sign) are the pruned entries,
        the rest are kept with their values; applied, it replaces the base tensor entirely."""
        tensor = tensor.detach().to("cpu", torch.float32)
        positions = _flat_nonzero(tensor != 0)
        return cls(tuple(tensor.shape), positions, tensor.reshape(-1)[positions], SPARSE)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nnz(self) -> int:
        """How many positions the change names (for "sparse": the kept entries)."""
        return self.positions.numel()

    @property
    def stores_values(self) -> bool:
        return self.kind != MASK

    def to_dense(self) -> torch.Tensor:
        """The change as a dense tensor of `shape`: for "add" the diff (float32), for "mask" a bool
        tensor that is True where entries are switched off, for "sparse" the new tensor (float32)."""
        if self.kind == MASK:
            dense = torch.zeros(self.numel, dtype=torch.bool)
            dense[self.positions] = True
        else:
            dense = torch.zeros(self.numel, dtype=torch.float32)
            dense[self.positions] = self.values
        return dense.reshape(self.shape)


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().squeeze(1)  # nonzero() returns sorted indices
