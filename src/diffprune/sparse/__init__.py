"""Sparse inference on the CPU: pruned Linear layers run by a sparse kernel (SparseLinear),
swapped into any HF encoder by `sparsify`, and timed against dense by `compare_speed`."""

from diffprune.sparse.convert import SparsifyReport, sparsify, sparsify_for_eval
from diffprune.sparse.linear import SparseLinear

__all__ = ["SparseLinear", "SparsifyReport", "sparsify", "sparsify_for_eval"]
