"""One BERT-style encoder layer in one compiled call, every step on numba's threads.

Why: with the Linear layers sparse, a layer's other work (attention, GELU, LayerNorm, residual
adds) is about half of its time in torch, and torch's OpenMP threads, spinning between their
ops, keep a second kernel thread from paying (convert.py). Here the whole layer runs as one
numba call: no torch op inside it, so every step gets every thread.

The steps, each a parallel loop over the calling thread's numba pool:
  1. q, k, v = x Wq^T + bq, ... (the sparse kernel's row blocks, kernel.py)
  2. attention per (sequence, head): softmax(q k^T * scale + mask) v
  3. h = LayerNorm(ctx Wo^T + bo + x)
  4. u = GELU(h Wi^T + bi)          (exact GELU: erf, not its tanh form)
  5. out = LayerNorm(u Wd^T + bd + h)
The exponential and erf are polynomial forms that vectorise (libm's are scalar calls here):
Cephes' expf (relative error < 1e-7 on [-87, 0]) and the rational erf of Eigen and XLA
(absolute error < 5e-7), measured against float64 in tests/test_sparse_fused.py.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from diffprune.sparse.kernel import _compile, numba
from diffprune.sparse.simd import ROW_TILE, transpose8

nb = numba()
JIT = dict(nogil=True, cache=True)
# Sums may be reordered (vector reductions) and multiply-adds fused; NaN and infinity keep their
# meaning (a mask's -inf stays one), which the full fastmath would give up.
FAST = {"reassoc", "contract", "nsz", "arcp"}
run = _compile()["run"]
row_16, row_32, row_64 = ROW_TILE[(1, 4)], ROW_TILE[(2, 4)], ROW_TILE[(4, 4)]

f32 = np.float32
LOG2E, LN2_HI, LN2_LO = f32(1.44269504088896341), f32(0.693359375), f32(-2.12194440e-4)
EXP_POLY = tuple(f32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                  1.6666665459e-1, 5.0000001201e-1))
ERF_NUM = tuple(f32(c) for c in (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
                                 -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
                                 -1.60960333262415e-02))
ERF_DEN = tuple(f32(c) for c in (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
                                 -7.37332916720468e-03, -1.42647390514189e-02))
ZERO, HALF, ONE, SQRT_HALF, NEG_INF = f32(0.0), f32(0.5), f32(1.0), f32(0.7071067811865476), f32(-np.inf)


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits` (2^n is (n + 127) << 23)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@nb.njit(inline="always", fastmath=FAST, **JIT)
def exp_nonpositive(x):
    """e^x for x <= 0 (softmax's inputs less their maximum); below -87 it is e^-87 (< 2e-38)."""
    x = max(x, f32(-87.0))
    n = np.floor(x * LOG2E + HALF)
    r = x - n * LN2_HI - n * LN2_LO
    p = EXP_POLY[0]
    for c in EXP_POLY[1:]:
        p = p * r + c
    return (p * r * r + r + ONE) * _float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@nb.njit(inline="always", fastmath=FAST, **JIT)
def erf(x):
    x = min(max(x, f32(-4.0)), f32(4.0))  # beyond, erf is +-1 in float32
    x2 = x * x
    p = ERF_NUM[0]
    for c in ERF_NUM[1:]:
        p = p * x2 + c
    q = ERF_DEN[0]
    for c in ERF_DEN[1:]:
        q = q * x2 + c
    return x * p / q


@nb.njit(parallel=True, **JIT)
def _matmul(indptr, indices, data, bias, cuts, x, y, scratch, tile, parts):
    """y = x W^T + b, the sparse kernel's work items shared among `parts` threads: kernel.py's
    spmm_parallel, written again here because calling that one from this module's compiled code
    made a fused layer 30% slower (1.3 against 1.0 ms, MiniLM at 95%; measured)."""
    items = ((x.shape[0] + tile - 1) // tile) * (cuts.size - 1)
    for p in nb.prange(parts):
        run(indptr, indices, data, x, bias, y, scratch[nb.get_thread_id()], cuts, tile,
            p * items // parts, (p + 1) * items // parts)


HEAD_DIMS = (16, 32, 64)  # the head widths the vector rows below take (ROW_TILE's 1, 2 or 4 vectors)
KEYS = 64  # keys per chunk of the scores: one ROW_TILE row of 4 vectors


@nb.njit(inline="always", **JIT)
def _weighted_rows(rows, positions, weights, n, out, width):
    """out[0 : width] = sum over r < n of weights[r] * rows[r, :] (addresses; rows `width` wide)."""
    if width == 16:
        row_16(rows, positions, weights, 0, n, ZERO, out)
    elif width == 32:
        row_32(rows, positions, weights, 0, n, ZERO, out)
    else:
        row_64(rows, positions, weights, 0, n, ZERO, out)


@nb.njit(**JIT)
def attention_floats(seq, dim):
    """Scratch floats a thread of _attention takes."""
    chunks = (seq + KEYS - 1) // KEYS
    return chunks * KEYS * dim + seq * dim + chunks * KEYS


@nb.njit(parallel=True, fastmath=FAST, **JIT)
def _attention(q, k, v, mask, ctx, seq, heads, scale, scratch, positions):
    """ctx[rows of sequence b, head h] = softmax(q_h k_h^T * scale + mask[b]) v_h, one (b, h) a
    task; mask: (sequences, 1 or seq, seq), added to the scores; positions: 0, 1, 2, ... (int32,
    at least max(seq, head width) of them).

    A head's keys are laid out in chunks of KEYS, transposed (kt[chunk, d, key]), and its values
    as rows (vh[key, d]), so that a query's scores are, chunk by chunk, the query's entries
    weighting kt's rows, and its output the probabilities weighting vh's rows: both the sparse
    kernel's vector rows (simd.ROW_TILE), sums in registers."""
    dim, width = q.shape[1] // heads, q.shape[1]
    chunks = (seq + KEYS - 1) // KEYS
    for task in nb.prange((q.shape[0] // seq) * heads):
        b, h = task // heads, task % heads
        mine = scratch[nb.get_thread_id()]
        kt = mine[: chunks * KEYS * dim].reshape((chunks, dim, KEYS))
        vh = mine[chunks * KEYS * dim: chunks * KEYS * dim + seq * dim].reshape((seq, dim))
        s = mine[chunks * KEYS * dim + seq * dim: attention_floats(seq, dim)]
        r0, c0 = b * seq, h * dim
        kt[chunks - 1] = 0  # keys past seq in the last chunk: scored, never read
        whole = seq // 8 * 8
        for j0 in range(0, whole, 8):  # 8 x 8 blocks by vector shuffles
            for d0 in range(0, dim, 8):
                transpose8(k.ctypes.data + 4 * ((r0 + j0) * width + c0 + d0), width,
                           kt.ctypes.data + 4 * ((j0 // KEYS * dim + d0) * KEYS + j0 % KEYS), KEYS, False)
        for j in range(whole, seq):
            for d in range(dim):
                kt[j // KEYS, d, j % KEYS] = k[r0 + j, c0 + d]
        for j in range(seq):
            vh[j] = v[r0 + j, c0: c0 + dim]
        for i in range(seq):
            query = q.ctypes.data + 4 * ((r0 + i) * width + c0)
            for c in range(chunks):
                row_64(kt.ctypes.data + 4 * c * dim * KEYS, positions.ctypes.data, query, 0, dim, ZERO,
                       s.ctypes.data + 4 * c * KEYS)
            m = mask[b, i if mask.shape[1] > 1 else 0]
            top = NEG_INF
            for j in range(seq):
                s[j] = s[j] * scale + m[j]
                top = max(top, s[j])
            total = f32(0.0)
            for j in range(seq):
                s[j] = exp_nonpositive(s[j] - top)
                total += s[j]
            inv = ONE / total
            for j in range(seq):
                s[j] *= inv
            _weighted_rows(vh.ctypes.data, positions.ctypes.data, s.ctypes.data, seq,
                           ctx.ctypes.data + 4 * ((r0 + i) * width + c0), dim)


@nb.njit(parallel=True, fastmath=FAST, **JIT)
def _add_norm(y, residual, gamma, beta, eps):
    """y = LayerNorm(y + residual), row by row (the biased variance, as torch's)."""
    n, inv_n = y.shape[1], ONE / f32(y.shape[1])
    for t in nb.prange(y.shape[0]):
        mean = f32(0.0)
        for f in range(n):
            y[t, f] += residual[t, f]
            mean += y[t, f]
        mean *= inv_n
        var = f32(0.0)
        for f in range(n):
            var += (y[t, f] - mean) ** 2
        inv = ONE / np.sqrt(var * inv_n + eps)
        for f in range(n):
            y[t, f] = (y[t, f] - mean) * inv * gamma[f] + beta[f]


@nb.njit(parallel=True, fastmath=FAST, **JIT)
def _gelu(y):
    for t in nb.prange(y.shape[0]):
        for f in range(y.shape[1]):
            y[t, f] = HALF * y[t, f] * (ONE + erf(y[t, f] * SQRT_HALF))


@nb.njit(**JIT)
def work_floats(tokens, hidden, inner):
    """Floats of encoder_layer's intermediates: q, k, v, the attention's output, h; u."""
    return 5 * tokens * hidden + tokens * inner


@nb.njit(**JIT)
def encoder_layer(x, out, mask, qkv, attn_out, up, down, norms, consts, seq, heads, work, scratch, positions,
                  tile, parts):
    """out = the BERT layer of x (tokens, hidden), sequences of `seq` tokens one after another.
    qkv: the three CSR matrices; attn_out, up, down: one each (indptr, indices, values, bias,
    row blocks); norms: (gamma, beta) of the two LayerNorms; consts: the attention's scale and
    the two LayerNorms' eps; work: a float32 row for the layer's intermediates (work_floats)."""
    tokens, hidden = x.shape
    inner = up[0].size - 1
    q = work[: tokens * hidden].reshape((tokens, hidden))
    k = work[tokens * hidden: 2 * tokens * hidden].reshape((tokens, hidden))
    v = work[2 * tokens * hidden: 3 * tokens * hidden].reshape((tokens, hidden))
    ctx = work[3 * tokens * hidden: 4 * tokens * hidden].reshape((tokens, hidden))
    h = work[4 * tokens * hidden: 5 * tokens * hidden].reshape((tokens, hidden))
    u = work[5 * tokens * hidden: 5 * tokens * hidden + tokens * inner].reshape((tokens, inner))
    _matmul(*qkv[0], x, q, scratch, tile, parts)
    _matmul(*qkv[1], x, k, scratch, tile, parts)
    _matmul(*qkv[2], x, v, scratch, tile, parts)
    _attention(q, k, v, mask, ctx, seq, heads, consts[0], scratch, positions)
    _matmul(*attn_out, ctx, h, scratch, tile, parts)
    _add_norm(h, x, norms[0][0], norms[0][1], consts[1])
    _matmul(*up, h, u, scratch, tile, parts)
    _gelu(u)
    _matmul(*down, u, out, scratch, tile, parts)
    _add_norm(out, h, norms[1][0], norms[1][1], consts[2])
