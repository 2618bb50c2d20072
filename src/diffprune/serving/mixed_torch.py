"""Mixed batches in torch operations: the path taken where the numba kernels (kernel.py) do not
apply (gradients on, another device or dtype). The same sums, out of place: each row's task's
Linear deltas as one block-diagonal sparse product, its bias and norm vectors and changed
embedding entries as per-row gathers. `per_slot` lists each slot's SparseDiff (None: unchanged).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffprune.patch.kinds import SparseDiff

PerSlot = list[SparseDiff | None]


def linear(m: nn.Linear, x: torch.Tensor, out: torch.Tensor, changed: dict[str, PerSlot],
           row_slots: torch.Tensor) -> torch.Tensor:
    batch = row_slots.numel()
    if "weight" in changed:
        out = out + _sparse_rows_product(x, changed["weight"], row_slots, m.in_features, m.out_features)
    if "bias" in changed:
        rows = _rows_of(changed["bias"], m.out_features, out, row_slots)
        out = out + rows.view(batch, *[1] * (out.dim() - 2), m.out_features)
    return out


def layer_norm(m: nn.LayerNorm, x: torch.Tensor, changed: dict[str, PerSlot], row_slots: torch.Tensor) -> torch.Tensor:
    """The norm's output recomputed from its input with each row's own scale and shift."""
    size = m.normalized_shape[0]
    shape = (row_slots.numel(), *[1] * (x.dim() - 2), size)
    weight, bias = m.weight.detach(), m.bias.detach() if m.bias is not None else None
    if "weight" in changed:
        weight = (weight + _rows_of(changed["weight"], size, x, row_slots)).view(shape)
    if "bias" in changed:
        bias = (bias + _rows_of(changed["bias"], size, x, row_slots)).view(shape)
    normed = F.layer_norm(x, m.normalized_shape, None, None, m.eps) * weight
    return normed if bias is None else normed + bias


def embedding(m: nn.Embedding, ids: torch.Tensor, out: torch.Tensor, per_slot: PerSlot,
              row_slots: torch.Tensor) -> torch.Tensor:
    batch = row_slots.numel()
    ids = ids.expand(batch, *ids.shape[1:]).reshape(batch, -1)
    tokens, dim = ids.shape[1], m.embedding_dim
    result = out.expand(batch, *out.shape[1:]).contiguous()
    slots = row_slots.to(ids.device)
    for s, d in enumerate(per_slot):
        rows = (slots == s).nonzero().squeeze(1) if d is not None else None
        if rows is None or not rows.numel():
            continue
        # The changed entries of each looked-up row: a range of the sorted flat positions.
        row_start = (ids[rows] * dim).reshape(-1)
        positions = d.positions.to(ids.device)
        lo = torch.searchsorted(positions, row_start)
        counts = torch.searchsorted(positions, row_start + dim) - lo
        token = torch.repeat_interleave(torch.arange(counts.numel(), device=ids.device), counts)
        entry = torch.arange(int(counts.sum()), device=ids.device) - torch.repeat_interleave(
            counts.cumsum(0) - counts - lo, counts)
        column = positions[entry] - row_start[token]
        where = (rows[token // tokens] * tokens + token % tokens) * dim + column
        result.view(-1).index_add_(0, where, d.values[entry].to(result.device, result.dtype))
    return result


def _rows_of(per_slot: PerSlot, size: int, like: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
    """(batch, size): each row's own task's dense delta vector (zero for tasks without one)."""
    table = like.new_zeros((len(per_slot), size))
    for s, d in enumerate(per_slot):
        if d is not None:
            table[s].index_add_(0, d.positions.to(like.device), d.values.to(like.device, like.dtype))
    return table[row_slots.to(like.device)]


def _sparse_rows_product(x: torch.Tensor, per_slot: PerSlot, row_slots: torch.Tensor, n_in: int,
                         n_out: int) -> torch.Tensor:
    """Row r's input times its task's sparse weight delta (transposed), for every row at once."""
    batch = x.shape[0]
    rows = [per_slot[int(s)] for s in row_slots.tolist()]
    counts = torch.tensor([d.nnz if d is not None else 0 for d in rows])
    if int(counts.sum()) == 0:
        return x.new_zeros(())
    positions = torch.cat([d.positions for d in rows if d is not None])
    values = torch.cat([d.values for d in rows if d is not None])
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
