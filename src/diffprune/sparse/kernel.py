"""The sparse CPU kernel: y^T = W x^T + b with W in compressed rows (CSR), compiled by numba.

Layout: the activations are used transposed, one row per input feature holding that feature's
value for every token, so each nonzero w[o, i] updates the contiguous token vector y^T[o, :]
with w * x^T[i, :]: a vectorised multiply-add over tokens, no gather. Nonzeros are taken eight
(then four) at a time so that each pass over y^T[o, :] does eight multiply-adds per load and
store of it (measured: 5 to 15% faster than four at a time on 384 x 1536 at 80 to 95%).

Threads: the rows are cut into blocks of equal nonzero counts, one block per thread, run by
numba's `prange` on as many threads as torch uses (`torch.get_num_threads()`) when called.
The pool is numba's TBB layer where the tbb package is installed (a dependency on x86-64),
else its own "workqueue" layer, never its OpenMP layer unless NUMBA_THREADING_LAYER asks: that
one loads a second OpenMP runtime beside torch's, and the two runtimes' threads spin for
milliseconds after each parallel region, each taking the cores the other needs next (measured
here: single layers at 6 to 8 ms instead of 0.2). TBB starts a kernel in about 5 µs and its
threads soon sleep; workqueue's threads always sleep but take about 50 µs to start, and it
takes one call at a time, hence the lock.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import numpy as np
import torch

from diffprune.errors import DiffpruneError

_numba = None


def numba():
    """numba, imported on first use (its import costs a second; dense users never pay it)."""
    global _numba
    if _numba is None:
        try:
            import numba as nb
        except ImportError as e:  # pragma: no cover - a hard dependency
            raise DiffpruneError("sparse inference needs the package numba (pip install numba)") from e
        if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
            nb.config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]
        _numba = nb
    return _numba


_KERNELS: dict[str, object] = {}
_POOL_LOCK = threading.Lock()


def _compile() -> dict[str, object]:
    """Compile (or load from numba's on-disk cache) the kernels, once per process."""
    if _KERNELS:
        return _KERNELS
    nb = numba()
    # 'contract' lets LLVM fuse multiply and add (FMA); no other fast-math licence, so NaN and
    # infinities in the activations propagate exactly as in dense arithmetic.
    jit = dict(fastmath={"contract"}, nogil=True, cache=True)

    @nb.njit(**jit)
    def rows(indptr, indices, data, xT, bias, yT, r0, r1):
        tokens = xT.shape[1]
        for o in range(r0, r1):
            acc = yT[o]
            b = bias[o]
            for t in range(tokens):
                acc[t] = b
            k = indptr[o]
            end = indptr[o + 1]
            while k + 8 <= end:
                w0, w1, w2, w3 = data[k], data[k + 1], data[k + 2], data[k + 3]
                w4, w5, w6, w7 = data[k + 4], data[k + 5], data[k + 6], data[k + 7]
                x0, x1, x2, x3 = xT[indices[k]], xT[indices[k + 1]], xT[indices[k + 2]], xT[indices[k + 3]]
                x4, x5, x6, x7 = xT[indices[k + 4]], xT[indices[k + 5]], xT[indices[k + 6]], xT[indices[k + 7]]
                for t in range(tokens):
                    acc[t] += ((w0 * x0[t] + w1 * x1[t] + w2 * x2[t] + w3 * x3[t])
                               + (w4 * x4[t] + w5 * x5[t] + w6 * x6[t] + w7 * x7[t]))
                k += 8
            while k + 4 <= end:
                w0, w1, w2, w3 = data[k], data[k + 1], data[k + 2], data[k + 3]
                x0, x1, x2, x3 = xT[indices[k]], xT[indices[k + 1]], xT[indices[k + 2]], xT[indices[k + 3]]
                for t in range(tokens):
                    acc[t] += w0 * x0[t] + w1 * x1[t] + w2 * x2[t] + w3 * x3[t]
                k += 4
            while k < end:
                w0 = data[k]
                x0 = xT[indices[k]]
                for t in range(tokens):
                    acc[t] += w0 * x0[t]
                k += 1

    @nb.njit(parallel=True, **jit)
    def spmm(blocks, indptr, indices, data, xT, bias, yT):
        for b in nb.prange(blocks.shape[0] - 1):
            rows(indptr, indices, data, xT, bias, yT, blocks[b], blocks[b + 1])

    _KERNELS.update(rows=rows, spmm=spmm)
    return _KERNELS


def csr_from_dense(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr int32, indices int16 or int32, values float32) of a 2-D weight's nonzeros.

    Column indices take 2 bytes where the input has at most 32768 features (every encoder this
    library meets), so a kept weight costs 6 bytes instead of 8."""
    w = weight.detach().to("cpu", torch.float32).contiguous()
    if w.dim() != 2:
        raise DiffpruneError(f"a sparse weight must be a matrix, not a tensor of shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise DiffpruneError("the weight holds NaN or infinite values; a sparse copy would hide where they act")
    rows, cols = w.nonzero(as_tuple=True)
    indptr = np.zeros(w.shape[0] + 1, np.int32)
    np.cumsum(np.bincount(rows.numpy(), minlength=w.shape[0]), out=indptr[1:])
    index_type = np.int16 if w.shape[1] <= 2**15 else np.int32
    return indptr, cols.numpy().astype(index_type), w[rows, cols].numpy().copy()


def row_blocks(indptr: np.ndarray, parts: int) -> np.ndarray:
    """Boundaries of `parts` consecutive row ranges holding about equal numbers of nonzeros
    (a learned pattern can pile its nonzeros into a few rows), as int64 for the kernel."""
    n_rows, nnz = len(indptr) - 1, int(indptr[-1])
    targets = np.linspace(0, nnz, parts + 1)[1:-1]
    cuts = np.searchsorted(indptr, targets, side="left").clip(0, n_rows)
    return np.unique(np.concatenate([[0], cuts, [n_rows]])).astype(np.int64)


_MAX_THREADS: list[int] = []


def max_threads() -> int:
    """The most threads numba was started with (NUMBA_NUM_THREADS, by default the CPU count)."""
    if not _MAX_THREADS:
        _MAX_THREADS.append(int(numba().config.NUMBA_NUM_THREADS))
    return _MAX_THREADS[0]


def kernel_threads() -> int:
    """The threads the kernel runs on: torch's count (torch refuses fewer than 1), capped at
    numba's pool."""
    return min(torch.get_num_threads(), max_threads())


def sparse_matmul_t(blocks: np.ndarray, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                    xT: np.ndarray, bias: np.ndarray, yT: np.ndarray, threads: int) -> None:
    """yT[o, :] = bias[o] + sum_k data[k] * xT[indices[k], :] over row o's nonzeros, on `threads`."""
    kernels = _compile()
    if threads == 1:
        kernels["rows"](indptr, indices, data, xT, bias, yT, 0, len(indptr) - 1)
        return
    with pool(threads):
        kernels["spmm"](blocks, indptr, indices, data, xT, bias, yT)


@contextmanager
def pool(threads: int):
    """numba's parallel kernels run on `threads` threads within the block, one caller at a time."""
    nb = numba()
    with _POOL_LOCK:
        if nb.get_num_threads() != threads:  # numba's setting is per calling thread
            nb.set_num_threads(threads)
        yield
