"""The numba kernels of the compact form (compact.py): coding positions, and applying and
reverting every "add" change of a patch in one call each.

Positions are coded as gaps (position - previous - 1, the first from -1) in LEB128 varints: seven
bits a byte, the high bit set on every byte but a gap's last. `next_position` is the one decoder;
the mixed-batch kernels (serving/kernel.py) inline it too, so every reader decodes alike.
Imported on first use: numba's import costs a second that dense users never pay.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# Columns of a CompactDiffs table, one row per tensor.
BYTE, ENTRY, NNZ, CHECK, BLOCK = range(5)
# Columns of its checkpoints: where decoding may start, and the position before that entry.
CK_BYTE, CK_ENTRY, CK_PREV = range(3)
# Value codes: 16-bit patterns (widen), or float32 stored as pairs of them.
FLOAT16, BFLOAT16, FLOAT32 = range(3)

JIT = dict(nogil=True, cache=True)


@nb.njit(inline="always", **JIT)
def next_position(stream, k, prev):
    """The position whose gap is coded at byte k (the one before it is prev), and the byte after.

    Gaps of one or two bytes (below 16384: all but rare ones at densities over 0.01%) decode
    without a branch: a mispredicted branch per entry, as a byte-by-byte loop takes at 0.5%
    density, also throws away the memory reads in flight, making apply several times slower."""
    b0 = np.int64(stream[k])
    b1 = np.int64(stream[k + 1])  # the padding byte after the last gap makes this safe
    more = b0 >> 7
    if more & (b1 >> 7):
        return _long_gap(stream, k, prev)
    gap = (b0 & 127) | (((b1 & 127) << 7) * more)
    return prev + 1 + gap, k + 1 + more


@nb.njit(**JIT)
def _long_gap(stream, k, prev):
    b = np.int64(stream[k])
    gap = b & 127
    shift = 7
    k += 1
    while b >= 128:
        b = np.int64(stream[k])
        gap |= (b & 127) << shift
        shift += 7
        k += 1
    return prev + 1 + gap, k


@nb.njit(inline="always", **JIT)
def widen(h, code, pow2):
    """The float32 value of the 16-bit pattern h, fp16 (code FLOAT16) or bf16, exactly: (implicit
    bit + mantissa) times a power of two from `pow2` (compact.powers_of_two(): 2 KiB, which stays
    in the first-level cache, where a table of all 65536 values is evicted by the weights an
    apply touches and costs a memory access per entry)."""
    h = np.int64(h)
    width = 10 if code == FLOAT16 else 7
    top = 31 if code == FLOAT16 else 255
    e = (h >> width) & top
    m = h & ((1 << width) - 1)
    sign = np.float32(1 - 2 * (h >> 15))
    if e == top:  # infinities and NaN (patch values are finite; exact all the same)
        return sign * np.float32(np.inf) if m == 0 else np.float32(np.nan)
    implicit = (1 << width) if e > 0 else 0
    return sign * (np.float32(implicit + m) * pow2[code, e])


@nb.njit(**JIT)
def encode(positions):
    """The gap bytes of sorted unique positions (int64), one padding zero byte after them."""
    size = 1
    prev = -1
    for p in positions:
        gap = p - prev - 1
        size += 1
        while gap >= 128:
            gap >>= 7
            size += 1
        prev = p
    out = np.zeros(size, np.uint8)
    k = 0
    prev = -1
    for p in positions:
        gap = p - prev - 1
        while gap >= 128:
            out[k] = (gap & 127) | 128
            gap >>= 7
            k += 1
        out[k] = gap
        k += 1
        prev = p
    return out


@nb.njit(**JIT)
def decode(stream, k, nnz):
    """nnz positions whose gaps start at byte k."""
    out = np.empty(nnz, np.int64)
    pos = np.int64(-1)
    for j in range(nnz):
        pos, k = next_position(stream, k, pos)
        out[j] = pos
    return out


@nb.njit(**JIT)
def checkpoints(positions, stream, k, block):
    """For every block of `block` positions, where decoding of its first entry starts:
    (byte, entry index, previous position), as rows of an int64 array."""
    count = (positions[-1] // block + 1) if positions.size else 0
    out = np.empty((count, 3), np.int64)
    e = 0
    prev = np.int64(-1)
    for c in range(count):
        while e < positions.size and positions[e] < c * block:
            prev, k = next_position(stream, k, prev)
            e += 1
        out[c, 0], out[c, 1], out[c, 2] = k, e, prev
    return out


# Entries handled per pass: their positions decoded (each entry's cache line asked for as soon
# as its position is known), then every original read, then every sum written. Reads that wait
# on no write are all in flight together (a read then a write per entry stalls on the writes
# queued behind TLB and cache misses: 5 to 7x slower on an embedding); the prefetches start them
# while the rest of the pass decodes (apply 25% faster on MiniLM at 0.5%).
CHUNK = 128


@intrinsic
def prefetch(typingctx, address):
    """Ask for the cache line at `address` (an int64), for writing, into every cache level."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):
        byte = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [byte, i32, i32, i32]))
        builder.call(fn, [builder.inttoptr(args[0], byte), ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


# Columns of a work split (`split`): tensor, first byte, first entry, entry past the last,
# and the position before the first entry.
W_TENSOR, W_BYTE, W_ENTRY, W_END, W_PREV = range(5)


@nb.njit(**JIT)
def split(stream, table, parts):
    """Cut every tensor's entries into `parts` runs of about equal counts, in order, as rows of
    work (W_* columns) and the first row of each part (bounds, parts + 1 of them). A cut inside
    a tensor decodes up to it once, here, so that each part starts decoding where it begins."""
    total = table[:, NNZ].sum()
    rows = np.empty((table.shape[0] + parts, 5), np.int64)
    bounds = np.zeros(parts + 1, np.int64)
    r = 0
    part = 1
    done = 0  # entries before the current row's first
    for t in range(table.shape[0]):
        k, e, end = table[t, BYTE], table[t, ENTRY], table[t, ENTRY] + table[t, NNZ]
        pos = np.int64(-1)
        while e < end:
            cut = (total * part) // parts  # this part ends at entry `cut` of the whole patch
            stop = min(end, e + max(cut - done, 0)) if part < parts else end
            if stop > e:
                rows[r, W_TENSOR], rows[r, W_BYTE], rows[r, W_ENTRY], rows[r, W_END], rows[r, W_PREV] = t, k, e, stop, pos
                r += 1
                for _ in range(e, stop):
                    pos, k = next_position(stream, k, pos)
                done += stop - e
                e = stop
            if part < parts and done >= cut:
                bounds[part] = r
                part += 1
    bounds[part:] = r
    return rows[:r].copy(), bounds


@nb.njit(**JIT)
def apply_add(flats, which, stream, bits, code, pow2, work, save, where):
    """Add every tensor's values at its positions in flats[which[t]], keeping the entries that
    were there (save[e]) and their positions (where[e]) for the revert, which writes back the
    very bits without decoding again. `work`: rows of `split`, all of them here."""
    for r in range(work.shape[0]):
        _apply_run(flats[which[work[r, W_TENSOR]]], stream, bits, code, pow2, work[r], save, where)


@nb.njit(parallel=True, **JIT)
def apply_add_parallel(flats, which, stream, bits, code, pow2, work, bounds, save, where):
    """apply_add with each part of the split on a thread of its own (the parts write distinct
    entries: a patch's positions are unique)."""
    for part in nb.prange(bounds.size - 1):
        for r in range(bounds[part], bounds[part + 1]):
            _apply_run(flats[which[work[r, W_TENSOR]]], stream, bits, code, pow2, work[r], save, where)


@nb.njit(inline="always", **JIT)
def _apply_run(flat, stream, bits, code, pow2, run, save, where):
    address = flat.ctypes.data
    k, e, end, pos = run[W_BYTE], run[W_ENTRY], run[W_END], run[W_PREV]
    while e < end:
        n = min(CHUNK, end - e)
        for j in range(e, e + n):
            pos, k = next_position(stream, k, pos)
            where[j] = pos
            prefetch(address + 4 * pos)  # positions are below the tensor's size (checked when built)
        for j in range(e, e + n):
            save[j] = flat[where[j]]
        # One loop per value dtype: a test of the dtype per entry makes the loop 3 to 10x slower.
        if code == FLOAT32:
            _add(flat, where, save, e, n, bits.view(np.float32))
        else:
            _add_widened(flat, where, save, e, n, bits, code, pow2)
        e += n


@nb.njit(inline="always", **JIT)
def _add(flat, where, save, e, n, values):
    for j in range(e, e + n):
        flat[where[j]] = save[j] + values[j]


@nb.njit(inline="always", **JIT)
def _add_widened(flat, where, save, e, n, bits, code, pow2):
    for j in range(e, e + n):
        flat[where[j]] = save[j] + widen(bits[j], code, pow2)


@nb.njit(**JIT)
def revert_add(flats, which, work, save, where):
    """Write the saved entries back where apply_add found them."""
    for r in range(work.shape[0]):
        _revert_run(flats[which[work[r, W_TENSOR]]], work[r], save, where)


@nb.njit(parallel=True, **JIT)
def revert_add_parallel(flats, which, work, bounds, save, where):
    for part in nb.prange(bounds.size - 1):
        for r in range(bounds[part], bounds[part + 1]):
            _revert_run(flats[which[work[r, W_TENSOR]]], work[r], save, where)


@nb.njit(inline="always", **JIT)
def _revert_run(flat, run, save, where):
    for e in range(run[W_ENTRY], run[W_END]):
        flat[where[e]] = save[e]
