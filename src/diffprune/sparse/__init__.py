"""Sparse inference on the CPU: pruned Linear layers run by a sparse kernel (SparseLinear),
swapped into any HF encoder by `sparsify`, and timed against dense by `compare_speed`."""

from diffprune.sparse.convert import SparsifyReport, sparsify, sparsify_for_eval
from diffprune.sparse.linear import SparseLinear
from diffprune.sparse.speed import compare_speed, load_for_inference, load_sparse

__all__ = ["SparseLinear", "SparsifyReport", "compare_speed", "load_for_inference", "load_sparse", "sparsify",
           "sparsify_for_eval"]
