"""`SparseLinear`: a drop-in for a pruned `nn.Linear`, its weight held in compressed rows.

The weight becomes three buffers (row pointers, column indices, values), so `state_dict`,
`.to()` and printing need no special case; the bias stays a parameter. The forward pass hands
the kernel the input as torch holds it (rows of tokens) and gets the output the same way: the
kernel transposes tiles of tokens inside, in cache (kernel.py).

Inference only, on float32 CPU tensors: the kernel computes no gradient, so a call that would
need one is refused rather than answered with a tensor that silently has none.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from diffprune.errors import DiffpruneError
from diffprune.sparse import kernel


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored as CSR and multiplied by the sparse CPU kernel.

    Build one from a trained layer with `SparseLinear.from_linear(linear)`; outputs match the
    dense layer's to float32 rounding (the sums run in another order).
    """

    def __init__(self, in_features: int, out_features: int, indptr: np.ndarray, indices: np.ndarray,
                 values: np.ndarray, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("indptr", torch.from_numpy(np.ascontiguousarray(indptr)))
        self.register_buffer("indices", torch.from_numpy(np.ascontiguousarray(indices)))
        self.register_buffer("values", torch.from_numpy(np.ascontiguousarray(values)))
        zeros = torch.zeros(self.out_features)
        self.bias = nn.Parameter(bias.detach().to(torch.float32).clone(), requires_grad=False) if bias is not None \
            else None
        self._zero_bias = zeros.numpy()
        self._cuts: dict[int, np.ndarray] = {}
        self._views: tuple | None = None
        # The most threads the kernel takes (None: as many as torch uses); sparsify sets 1 (why: there).
        self.threads: int | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        if not isinstance(linear, nn.Linear):
            raise DiffpruneError(f"SparseLinear replaces an nn.Linear, not a {type(linear).__name__}")
        if linear.bias is not None and not torch.isfinite(linear.bias).all():
            raise DiffpruneError("the bias holds NaN or infinite values")
        indptr, indices, values = kernel.csr_from_dense(linear.weight)
        return cls(linear.in_features, linear.out_features, indptr, indices, values, linear.bias)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.in_features * self.out_features)

    def weight_bytes(self) -> int:
        """Bytes the weight takes: row pointers, column indices and values (the bias apart)."""
        return sum(t.numel() * t.element_size() for t in (self.indptr, self.indices, self.values))

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense matrix (for checks and export; the forward pass never builds it)."""
        rows = torch.repeat_interleave(torch.arange(self.out_features), self.indptr.diff().long())
        w = torch.zeros(self.out_features, self.in_features)
        w[rows, self.indices.long()] = self.values
        return w

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={self.density:.4f}")

    def _arrays(self) -> tuple[np.ndarray, ...]:
        """numpy views of the buffers, made again only when a buffer was replaced (a load or
        `.to()`): making them costs microseconds per call, which add up over a model's layers."""
        # Keyed by where the buffers' memory is, not by the tensor objects: a deep copy of the
        # module copies the views too, as arrays of their own that the copy's buffers are not.
        where = tuple(t.data_ptr() if t is not None else 0 for t in (self.indptr, self.indices, self.values, self.bias))
        if self._views is None or self._views[0] != where:
            bias = self.bias.detach().numpy() if self.bias is not None else self._zero_bias
            self._views = (where, (self.indptr.numpy(), self.indices.numpy(), self.values.numpy(), bias))
        return self._views[1]

    def _row_cuts(self, blocks: int) -> np.ndarray:
        if blocks not in self._cuts:
            self._cuts[blocks] = kernel.row_cuts(self.indptr.numpy(), blocks)
        return self._cuts[blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One cheap test on the common path (a model makes dozens of these calls per input).
        if (x.dtype is not torch.float32 or x.device.type != "cpu" or x.shape[-1] != self.in_features
                or (x.requires_grad and torch.is_grad_enabled())):
            self._refuse(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty(x2.shape[0], self.out_features)
        if x2.shape[0]:
            indptr, indices, values, bias = self._arrays()
            threads = kernel.kernel_threads() if self.threads is None else min(self.threads, kernel.kernel_threads())
            kernel.sparse_matmul(indptr, indices, values, x2.numpy(), bias, y.numpy(), self._row_cuts, threads)
        return y.reshape(*lead, self.out_features)

    def _refuse(self, x: torch.Tensor) -> None:
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise DiffpruneError(f"SparseLinear runs on float32 CPU tensors, not {x.dtype} on {x.device}")
        if x.shape[-1] != self.in_features:
            raise DiffpruneError(f"SparseLinear expects {self.in_features} input features, got {x.shape[-1]}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise DiffpruneError("SparseLinear is for inference: it computes no gradient "
                                 "(run it under torch.inference_mode() or torch.no_grad())")
