"""The CPU kernels of mixed batches (numba): each row's own task's delta added in place into the
output of a Linear, an Embedding or a LayerNorm, read straight from the tasks' compact form
(patch/compact.py), one call per module and batch.

Linear: for batch row b, whose task changes the weight by entries (o, i, w),
y[b, t, o] += w * x[b, t, i] for every token t. The row's entries are decoded once (they come
sorted by output row); then for each tile of 64 tokens the tile's inputs are transposed into a
per-thread buffer, so that an entry's work is vector multiply-adds over the tile's tokens, into
sums held in registers over each output row's entries (simd.ROW_TILE, as the sparse kernel's),
written once into a transposed output tile that is added into y at the end (measured on
MiniLM's shapes, one thread: 16-token tiles 30 to 45% slower, eight tokens at a time with
scalar gathers 2 to 3x).
Rows run in parallel (numba's prange) on as many threads as torch uses.
"""

from __future__ import annotations

import numpy as np

from diffprune.patch.compact_kernels import BLOCK, BYTE, CHECK, CK_BYTE, CK_ENTRY, CK_PREV, ENTRY, FLOAT32, NNZ
from diffprune.patch.compact_kernels import next_position, widen
from diffprune.sparse.kernel import kernel_threads, numba, pool, scratch
from diffprune.sparse.simd import ROW_TILE
from diffprune.sparse.tiles import load_tile, store_tile

nb = numba()  # configured once for every kernel of the library (its threading layer: sparse/kernel.py)
TILE = 64  # tokens per tile: a transposed row is four 64-byte vectors, the tile stays in L1 / L2
JIT = dict(nogil=True, cache=True)
PARALLEL = dict(parallel=True, fastmath={"contract"}, **JIT)


@nb.njit(**JIT)
def _values(bits, code, pow2, first, nnz):
    """Entries first .. first + nnz of a task's values, as float32."""
    out = np.empty(nnz, np.float32)
    if code == FLOAT32:
        out[:] = bits.view(np.float32)[first: first + nnz]
    else:
        for j in range(nnz):
            out[j] = widen(bits[first + j], code, pow2)
    return out


ROW_64 = ROW_TILE[(TILE // 16, 4)]


@nb.njit(**JIT)
def _row_starts(rows, n_rows):
    """Where each row's entries start in `rows` (sorted), and where the last row's end."""
    starts = np.zeros(n_rows + 1, np.int64)
    for r in rows:
        starts[r + 1] += 1
    for o in range(n_rows):
        starts[o + 1] += starts[o]
    return starts


@nb.njit(**JIT)
def _entries(stream, bits, code, pow2, table, t, width):
    """Tensor t's entries as (row, column, value) of a matrix `width` columns wide."""
    nnz = table[t, NNZ]
    rows, cols = np.empty(nnz, np.int32), np.empty(nnz, np.int32)
    inverse = 1.0 / width
    k, pos = table[t, BYTE], np.int64(-1)
    for j in range(nnz):
        pos, k = next_position(stream, k, pos)
        r = np.int64(pos * inverse)  # exact or one off (rounding): corrected without a branch
        r += np.int64(pos - r * width >= width) - np.int64(pos < r * width)
        rows[j], cols[j] = r, pos - r * width
    return rows, cols, _values(bits, code, pow2, table[t, ENTRY], nnz)


@nb.njit(**PARALLEL)
def linear_delta(x, y, row_slots, weight_t, bias_t, streams, bits, codes, tables, pow2, bias, scratch):
    """y (rows, tokens, out) = the base's bias plus each row's task's delta: its weight delta
    times x (rows, tokens, in) and its bias delta; the caller then adds the base's product into
    y (addmm), whose write of y carries the delta with no pass of its own. weight_t[s] / bias_t[s]:
    the tensor of slot s's task (-1: unchanged). scratch: a row per thread of (in + out) * TILE
    floats for the transposed tiles."""
    if not (x.flags.c_contiguous and y.flags.c_contiguous):  # the block transposes address them
        raise ValueError("linear_delta needs C-contiguous activations")
    tokens, n_in, n_out = x.shape[1], x.shape[2], y.shape[2]
    for b in nb.prange(x.shape[0]):
        s = row_slots[b]
        if weight_t[s] >= 0:
            outs, ins, w = _entries(streams[s], bits[s], codes[s], pow2, tables[s], weight_t[s], n_in)
            starts = _row_starts(outs, n_out)
            mine = scratch[nb.get_thread_id()]
            xt = mine[: n_in * TILE].reshape((n_in, TILE))
            yt = mine[n_in * TILE: (n_in + n_out) * TILE].reshape((n_out, TILE))
            xa, ya, ia, wa = xt.ctypes.data, yt.ctypes.data, ins.ctypes.data, w.ctypes.data
            for t0 in range(0, tokens, TILE):
                m = min(TILE, tokens - t0)
                load_tile(x[b], xt, t0, m, TILE)
                for o in range(n_out):  # a row without entries gets the bias alone
                    ROW_64(xa, ia, wa, starts[o], starts[o + 1], bias[o], ya + 4 * TILE * o)
                store_tile(yt, y[b], t0, m, 0, n_out, TILE, False)
        else:
            for t in range(tokens):
                y[b, t, :] = bias
        if bias_t[s] >= 0:  # a vector: as a matrix one row wide, its columns are the positions
            _, outs, w = _entries(streams[s], bits[s], codes[s], pow2, tables[s], bias_t[s], n_out)
            for t in range(tokens):
                for e in range(w.size):
                    y[b, t, outs[e]] += w[e]


@nb.njit(**PARALLEL)
def embedding_delta(ids, y, row_slots, weight_t, streams, bits, codes, tables, checks, pow2):
    """y (rows, tokens, dim) += the changed entries of each looked-up row of each row's task's
    embedding; ids (rows, tokens). A lookup decodes from the checkpoint before the row."""
    dim = y.shape[2]
    for b in nb.prange(y.shape[0]):
        s = row_slots[b]
        t = weight_t[s]
        if t < 0:
            continue
        table, stream, ck = tables[s], streams[s], checks[s]
        block, first_ck = table[t, BLOCK], table[t, CHECK]
        count = (table[t + 1, CHECK] if t + 1 < table.shape[0] else ck.shape[0]) - first_ck
        end = table[t, ENTRY] + table[t, NNZ]
        wide = bits[s].view(np.float32) if codes[s] == FLOAT32 else np.empty(0, np.float32)
        for tok in range(y.shape[1]):
            start = ids[b, tok] * dim
            c = start // block
            if c >= count:
                continue
            k, e, pos = ck[first_ck + c, CK_BYTE], ck[first_ck + c, CK_ENTRY], ck[first_ck + c, CK_PREV]
            while e < end:
                pos, k = next_position(stream, k, pos)
                if pos >= start + dim:
                    break
                if pos >= start:
                    v = wide[e] if codes[s] == FLOAT32 else widen(bits[s][e], codes[s], pow2)
                    y[b, tok, pos - start] += v
                e += 1


# The norm's sums may be reassociated (added in vector lanes): 2 to 3x faster, the same to float
# rounding; no other fast-math licence, so NaN and infinities still propagate.
@nb.njit(parallel=True, fastmath={"contract", "reassoc"}, **JIT)
def norm_delta(x, y, eps, row_slots, weight_t, bias_t, streams, bits, codes, tables, pow2):
    """y = LayerNorm(x) (rows, tokens, dim) gets each row's task's weight delta times the
    normalised input and its bias delta added."""
    tokens, dim = x.shape[1], x.shape[2]
    for b in nb.prange(x.shape[0]):
        s = row_slots[b]
        if weight_t[s] >= 0:
            _, cols, w = _entries(streams[s], bits[s], codes[s], pow2, tables[s], weight_t[s], dim)
            for t in range(tokens):
                xbt = x[b, t]
                mean = 0.0
                for i in range(dim):
                    mean += xbt[i]
                mean /= dim
                var = 0.0
                for i in range(dim):
                    var += (xbt[i] - mean) * (xbt[i] - mean)
                scale = 1.0 / np.sqrt(var / dim + eps)
                for e in range(w.size):
                    y[b, t, cols[e]] += w[e] * ((xbt[cols[e]] - mean) * scale)
        if bias_t[s] >= 0:
            _, cols, w = _entries(streams[s], bits[s], codes[s], pow2, tables[s], bias_t[s], dim)
            for t in range(tokens):
                for e in range(w.size):
                    y[b, t, cols[e]] += w[e]


class Slots:
    """The compact forms of a batch's tasks (slot s: tasks[s]) as numba lists, built once per
    batch: every kernel call of the batch then passes them as they are."""

    def __init__(self, tasks: list) -> None:
        from diffprune.patch.compact import powers_of_two

        self.streams = _list([c.stream for c in tasks], nb.uint8, 1)
        self.bits = _list([c.bits for c in tasks], nb.uint16, 1)
        self.tables = _list([c.table for c in tasks], nb.int64, 2)
        self.checks = _list([c.checks for c in tasks], nb.int64, 2)
        self.codes = np.array([c.code for c in tasks], np.int64)
        self.pow2 = powers_of_two()


def _list(arrays: list[np.ndarray], dtype, ndim: int):
    out = nb.typed.List.empty_list(nb.types.Array(dtype, ndim, "C"))  # typed even when empty
    for a in arrays:
        out.append(a)
    return out


def run(kernel, *args, scratch_floats: int = 0) -> None:
    """Call a parallel kernel on as many threads as torch uses (with a scratch row per thread
    of `scratch_floats` as its last argument, if asked)."""
    with pool(kernel_threads()):
        kernel(*args, *((scratch(scratch_floats),) if scratch_floats else ()))
