"""The sparse CPU kernel: y = x W^T + b with W in compressed rows (CSR), compiled by numba.

Layout: x (tokens, in) and y (tokens, out) stay as torch keeps them, row-major. The tokens are
taken in tiles (16 of them for up to 16 tokens, else 32): a tile of x is transposed into a
per-thread buffer (one row of tile floats per input feature, in 8 x 8 blocks of vector shuffles,
simd.py), so that each nonzero w[o, i] is one or two vector multiply-adds of that buffer's row i
into the tile's outputs for row o, which stay in vector registers for the whole row
(simd.ROW_TILE); the tile's outputs are transposed back into y. No transpose by torch: they cost
more than the kernel itself (a 128 x 1536 output took ~230 µs to copy back; measured).

Threads: the output rows are cut into one block per thread, of about equal nonzero counts, each
block computed over every tile of tokens (so each thread reads only its rows of the weight), by
numba's `prange` on as many threads as torch uses (`torch.get_num_threads()`), or fewer where
the layer says (SparseLinear.threads; sparsify sets one, see convert.py). The pool is numba's TBB layer where the tbb package is installed (a dependency on x86-64),
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
from collections.abc import Callable
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
    from diffprune.sparse.simd import ROW_TILE
    from diffprune.sparse.tiles import load_tile, store_tile

    jit = dict(nogil=True, cache=True)
    row_16_i16, row_16_i32, row_32_i16, row_32_i32 = (ROW_TILE[(1, 2)], ROW_TILE[(1, 4)], ROW_TILE[(2, 2)],
                                                      ROW_TILE[(2, 4)])

    @nb.njit(inline="always", **jit)
    def run(indptr, indices, data, x, bias, y, mine, row_cuts, tile, first, last):
        """Work items first .. last - 1 (block-major: a block of output rows over every tile of
        tokens, then the next block), with buffer `mine`."""
        tokens, n_in, n_out = x.shape[0], x.shape[1], y.shape[1]
        xt = mine[: n_in * tile].reshape((n_in, tile))
        yt = mine[n_in * tile: (n_in + n_out) * tile].reshape((n_out, tile))
        xa, ya, ia, da = xt.ctypes.data, yt.ctypes.data, indices.ctypes.data, data.ctypes.data
        tiles, narrow = (tokens + tile - 1) // tile, indices.itemsize == 2
        for item in range(first, last):
            t0 = (item % tiles) * tile
            m = min(tile, tokens - t0)
            r0, r1 = row_cuts[item // tiles], row_cuts[item // tiles + 1]
            load_tile(x, xt, t0, m, tile)
            for o in range(r0, r1):
                k0, k1, out = np.int64(indptr[o]), np.int64(indptr[o + 1]), ya + 4 * tile * o
                if tile == 16 and narrow:
                    row_16_i16(xa, ia, da, k0, k1, bias[o], out)
                elif tile == 16:
                    row_16_i32(xa, ia, da, k0, k1, bias[o], out)
                elif narrow:
                    row_32_i16(xa, ia, da, k0, k1, bias[o], out)
                else:
                    row_32_i32(xa, ia, da, k0, k1, bias[o], out)
            store_tile(yt, y, t0, m, r0, r1, tile, False)

    @nb.njit(**jit)
    def spmm(indptr, indices, data, x, bias, y, scratch, row_cuts, tile):
        run(indptr, indices, data, x, bias, y, scratch[0], row_cuts, tile, 0,
            ((x.shape[0] + tile - 1) // tile) * (row_cuts.size - 1))

    @nb.njit(parallel=True, **jit)
    def spmm_parallel(indptr, indices, data, x, bias, y, scratch, row_cuts, tile, parts):
        items = ((x.shape[0] + tile - 1) // tile) * (row_cuts.size - 1)
        for p in nb.prange(parts):
            run(indptr, indices, data, x, bias, y, scratch[nb.get_thread_id()], row_cuts, tile,
                p * items // parts, (p + 1) * items // parts)

    _KERNELS.update(run=run, spmm=spmm, spmm_parallel=spmm_parallel)
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


def row_cuts(indptr: np.ndarray, parts: int) -> np.ndarray:
    """Boundaries of `parts` consecutive row ranges holding about equal numbers of nonzeros
    (a learned pattern can pile its nonzeros into a few rows), at multiples of 8 (the block
    transposes' unit), as int64 for the kernel."""
    n_rows, nnz = len(indptr) - 1, int(indptr[-1])
    targets = np.linspace(0, nnz, parts + 1)[1:-1]
    cuts = np.searchsorted(indptr, targets, side="left") // 8 * 8
    return np.unique(np.concatenate([[0], cuts.clip(0, n_rows), [n_rows]])).astype(np.int64)


def tile_width(tokens: int) -> int:
    """Tokens per tile: 16 for up to 16 tokens (a wider tile computes padding), else 32 (measured
    on MiniLM's shapes at 128 tokens: 32 and 64 level, 16 up to 2x slower: each entry's index and
    value are read once per tile)."""
    return 16 if tokens <= 16 else 32


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


def sparse_matmul(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, x: np.ndarray, bias: np.ndarray,
                  y: np.ndarray, cuts: Callable[[int], np.ndarray], threads: int) -> None:
    """y[t, o] = bias[o] + sum_k data[k] * x[t, indices[k]] over row o's nonzeros, on `threads`
    threads; x and y C-contiguous float32; cuts(blocks): the row blocks (row_cuts), cached by
    the caller."""
    kernels, tokens = _compile(), x.shape[0]
    tile = tile_width(tokens)
    with pool(threads):
        buffers = scratch((x.shape[1] + y.shape[1]) * tile)
        if threads == 1:
            kernels["spmm"](indptr, indices, data, x, bias, y, buffers, cuts(1), tile)
        else:
            blocks = cuts(threads)
            kernels["spmm_parallel"](indptr, indices, data, x, bias, y, buffers, blocks, tile, len(blocks) - 1)


_SCRATCH = [np.empty((0, 0), np.float32)]


def scratch(floats: int) -> np.ndarray:
    """A row of `floats` per numba thread, kept between calls (fresh pages would cost a fault
    each 4 KiB on every call); taken inside the pool, where the kernels run one at a time."""
    if _SCRATCH[0].shape[1] < floats:
        _SCRATCH[0] = np.empty((numba().config.NUMBA_NUM_THREADS, floats), np.float32)
    return _SCRATCH[0]


_WORK = [np.empty(0, np.float32)]


def workspace(floats: int) -> np.ndarray:
    """A float32 row of at least `floats` for a fused layer's intermediates, kept between calls
    (as scratch, and for the same reason); taken inside the pool."""
    if _WORK[0].size < floats:
        _WORK[0] = np.empty(floats, np.float32)
    return _WORK[0]


_POSITIONS = [np.arange(0, dtype=np.int32)]


def positions(n: int) -> np.ndarray:
    """0, 1, ..., at least n of them (int32): the fused layer's row numbers (encoder_kernel.py)."""
    if _POSITIONS[0].size < n:
        _POSITIONS[0] = np.arange(max(n, 2 * _POSITIONS[0].size), dtype=np.int32)
    return _POSITIONS[0]


@contextmanager
def pool(threads: int):
    """numba's parallel kernels run on `threads` threads within the block, one caller at a time."""
    nb = numba()
    with _POOL_LOCK:
        if nb.get_num_threads() != threads:  # numba's setting is per calling thread
            nb.set_num_threads(threads)
        yield
