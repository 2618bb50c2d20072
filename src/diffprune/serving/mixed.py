"""Mixed-task batches: one forward for rows of different tasks, with no patch applied.

The base computes as it always does; forward hooks on the modules a batch's patches change add
each row's own task's delta to that module's output (wrapping, not forking: modules are found by
type, never by the model's name):

* nn.Linear weight: the delta's sparse product on that task's rows only, added into the output
  in place (kernel.py, on the CPU); elsewhere, or with gradients on, every row's entries are one
  block of a block-diagonal sparse matrix multiplied once with the rows' inputs;
* nn.Linear bias, nn.LayerNorm weight and bias: per-row gathers of each task's dense vector
  (a LayerNorm's output is recomputed from its normalised input with each row's own scale);
* nn.Embedding weight: per-row gathers of the changed entries of the looked-up rows.

Only "add" patches whose every change sits in such a module can join a mixed batch
(`mix_problem` says why another cannot); the others are served by switching. The results
equal those of the patch applied in place up to float rounding (tests: within 1e-5).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffprune.errors import DiffpruneError
from diffprune.patch.kinds import ADD, SparseDiff
from diffprune.serving import kernel

# The modules whose changes can be added per row, and which of their parameters.
MIXABLE = {nn.Linear: ("weight", "bias"), nn.Embedding: ("weight",), nn.LayerNorm: ("weight", "bias")}


def mix_problem(diffs: dict[str, SparseDiff | CompactDiff], modules: dict[str, nn.Module]) -> str | None:
    """Why a patch cannot join a mixed batch (None if it can)."""
    for name, d in diffs.items():
        path, _, local = name.rpartition(".")
        module = modules.get(path)
        if d.kind != ADD:
            return f"it holds '{d.kind}' changes"
        if type(module) not in MIXABLE or local not in MIXABLE[type(module)]:
            return f"it changes '{name}' of a {type(module).__name__}"
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            return f"it changes '{name}' of an embedding that renormalises rows"
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
            return f"it changes '{name}' of a norm over more than the last dimension"
    return None


@dataclass
class CompactDiff:
    """An "add" change as mixed batches read it, in less memory than a SparseDiff: positions as
    int32 where they fit, values in the dtype the patch file stored them in (exact: the file's
    values are what a SparseDiff holds, widened to float32)."""

    shape: tuple[int, ...]
    positions: torch.Tensor
    values: torch.Tensor
    kind: str = ADD

    @classmethod
    def of(cls, d: SparseDiff, value_dtype: torch.dtype) -> CompactDiff:
        index = torch.int32 if d.numel < 2**31 else torch.int64
        values = d.values.to(value_dtype)
        if not torch.equal(values.to(d.values.dtype), d.values):  # never round: keep what the patch holds
            values = d.values
        return cls(d.shape, d.positions.to(index), values, d.kind)

    @property
    def nnz(self) -> int:
        return self.positions.numel()

    @property
    def nbytes(self) -> int:
        return self.positions.nbytes + self.values.nbytes

    def widened(self) -> SparseDiff:
        return SparseDiff(self.shape, self.positions.to(torch.int64), self.values.to(torch.float32), self.kind)


class MixedBatch:
    """The deltas of a batch whose row r belongs to task slot row_slots[r] (slot s: diffs[s])."""

    def __init__(self, model: nn.Module, diffs: list[dict[str, SparseDiff | CompactDiff]],
                 row_slots: torch.Tensor) -> None:
        self.model, self.row_slots = model, row_slots
        self.batch = int(row_slots.numel())
        modules = dict(model.named_modules())
        self.changed: dict[str, dict[str, list[SparseDiff | None]]] = {}
        for s, slot in enumerate(diffs):
            problem = mix_problem(slot, modules)
            if problem:
                raise DiffpruneError(f"task slot {s} cannot join a mixed batch: {problem}")
            for name, d in slot.items():
                path, _, local = name.rpartition(".")
                per_slot = self.changed.setdefault(path, {}).setdefault(local, [None] * len(diffs))
                per_slot[s] = d
        self.modules = {path: modules[path] for path in self.changed}

    @contextmanager
    def installed(self):
        """Within the block, a forward of the model over the batch adds every row's delta."""
        handles = []
        try:
            for path, module in self.modules.items():
                handles.append(module.register_forward_hook(self._hook(module, self.changed[path])))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, module: nn.Module, changed: dict[str, list]):
        if isinstance(module, nn.Linear):
            return lambda m, args, out: self._linear(m, args[0], out, changed)
        if isinstance(module, nn.Embedding):
            return lambda m, args, out: self._embedding(m, args[0], out, changed["weight"])
        return lambda m, args, out: self._layer_norm(m, args[0], changed)

    # -- per-row vectors ------------------------------------------------------------------------
    def _rows_of(self, per_slot: list[SparseDiff | None], size: int, like: torch.Tensor) -> torch.Tensor:
        """(batch, size): each row's own task's dense delta vector (zero for tasks without one)."""
        table = like.new_zeros((len(per_slot), size))
        for s, d in enumerate(per_slot):
            if d is not None:
                table[s].index_add_(0, d.positions.to(like.device), d.values.to(like.device, like.dtype))
        return table[self.row_slots.to(like.device)]

    def _check_batch(self, x: torch.Tensor, module: nn.Module) -> None:
        if x.shape[0] != self.batch:
            raise DiffpruneError(f"a {type(module).__name__} got {x.shape[0]} rows for a batch of {self.batch}: "
                                 "this model does not keep the batch first")

    def _linear(self, m: nn.Linear, x: torch.Tensor, out: torch.Tensor, changed: dict) -> torch.Tensor:
        self._check_batch(x, m)
        if "weight" in changed:
            out = self._add_weight_delta(x, out, changed["weight"], m.in_features, m.out_features)
        if "bias" in changed:
            rows = self._rows_of(changed["bias"], m.out_features, out)
            out = out + rows.view(self.batch, *[1] * (out.dim() - 2), m.out_features)
        return out

    def _add_weight_delta(self, x: torch.Tensor, out: torch.Tensor, per_slot: list, n_in: int,
                          n_out: int) -> torch.Tensor:
        if not kernel.available(x) or torch.is_grad_enabled():
            return out + _sparse_rows_product(x, per_slot, self.row_slots, n_in, n_out)
        # Every slot's entries once, each row reading its own slot's range of them.
        present = [(s, d) for s, d in enumerate(per_slot) if d is not None]
        positions = torch.cat([d.positions for _, d in present])
        values = torch.cat([d.values.to(x.dtype) for _, d in present])
        ends = torch.tensor([d.nnz for _, d in present]).cumsum(0)
        slot_start = torch.zeros(len(per_slot), dtype=torch.int64)
        slot_end = torch.zeros(len(per_slot), dtype=torch.int64)
        slot_end[[s for s, _ in present]] = ends
        slot_start[[s for s, _ in present]] = ends - torch.tensor([d.nnz for _, d in present])
        out_index = positions // n_in
        in_index = positions - out_index * n_in
        result = out.contiguous().view(self.batch, -1, n_out)
        kernel.add_row_deltas(x.contiguous().view(self.batch, -1, n_in), result, out_index, in_index, values,
                              slot_start[self.row_slots], slot_end[self.row_slots])
        return result.view(out.shape)

    def _layer_norm(self, m: nn.LayerNorm, x: torch.Tensor, changed: dict) -> torch.Tensor:
        self._check_batch(x, m)
        size = m.normalized_shape[0]
        shape = (self.batch, *[1] * (x.dim() - 2), size)
        weight, bias = m.weight.detach(), m.bias.detach() if m.bias is not None else None
        if "weight" in changed:
            weight = (weight + self._rows_of(changed["weight"], size, x)).view(shape)
        if "bias" in changed:
            bias = (bias + self._rows_of(changed["bias"], size, x)).view(shape)
        normed = F.layer_norm(x, m.normalized_shape, None, None, m.eps) * weight
        return normed if bias is None else normed + bias

    def _embedding(self, m: nn.Embedding, ids: torch.Tensor, out: torch.Tensor, per_slot: list) -> torch.Tensor:
        if ids.shape[0] not in (1, self.batch):  # position ids come as one row for the whole batch
            self._check_batch(ids, m)
        ids = ids.expand(self.batch, *ids.shape[1:]).reshape(self.batch, -1)
        tokens, dim = ids.shape[1], m.embedding_dim
        result = out.expand(self.batch, *out.shape[1:]).contiguous()
        slots = self.row_slots.to(ids.device)
        for s, d in enumerate(per_slot):
            rows = (slots == s).nonzero().squeeze(1) if d is not None else None
            if rows is None or not rows.numel():
                continue
            # The changed entries of each looked-up row: a range of the sorted flat positions.
            row_start = (ids[rows] * dim).reshape(-1)
            positions = d.positions.to(ids.device)
            lo = torch.searchsorted(positions, row_start.to(positions.dtype))
            counts = torch.searchsorted(positions, (row_start + dim).to(positions.dtype)) - lo
            token = torch.repeat_interleave(torch.arange(counts.numel(), device=ids.device), counts)
            entry = torch.arange(int(counts.sum()), device=ids.device) - torch.repeat_interleave(
                counts.cumsum(0) - counts - lo, counts)
            column = positions[entry].to(torch.int64) - row_start[token]
            where = (rows[token // tokens] * tokens + token % tokens) * dim + column
            result.view(-1).index_add_(0, where, d.values[entry].to(result.device, result.dtype))
        return result


def _sparse_rows_product(x: torch.Tensor, per_slot: list, row_slots: torch.Tensor, n_in: int,
                         n_out: int) -> torch.Tensor:
    """Row r's input times its task's sparse weight delta (transposed), for every row at once."""
    batch = x.shape[0]
    rows = [per_slot[int(s)] for s in row_slots.tolist()]
    counts = torch.tensor([d.nnz if d is not None else 0 for d in rows])
    if int(counts.sum()) == 0:
        return x.new_zeros(())
    positions = torch.cat([d.positions.to(torch.int64) for d in rows if d is not None])
    values = torch.cat([d.values.to(torch.float32) for d in rows if d is not None])
    row = torch.repeat_interleave(torch.arange(batch), counts)
    out_index = positions // n_in
    # Positions are sorted row-major, so (row, out) keys come sorted: the CSR rows of the block.
    crow = torch.zeros(batch * n_out + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(row * n_out + out_index, minlength=batch * n_out).cumsum(0)
    column = row * n_in + (positions - out_index * n_in)
    tokens = x.reshape(batch, -1, n_in)
    x_t = tokens.transpose(1, 2).reshape(batch * n_in, -1)  # (rows x in, tokens): one copy
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        import scipy.sparse as sp

        block = sp.csr_matrix((values.to(x.dtype).numpy(), column.numpy(), crow.numpy()),
                              shape=(batch * n_out, batch * n_in))
        product = torch.from_numpy(np.asarray(block @ x_t.detach().numpy()))
    else:
        block = torch.sparse_csr_tensor(crow.to(x.device), column.to(x.device), values.to(x.device, x.dtype),
                                        (batch * n_out, batch * n_in))
        product = block @ x_t
    return product.view(batch, n_out, -1).transpose(1, 2).reshape(*x.shape[:-1], n_out)
