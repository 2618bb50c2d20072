"""8 x 8 float32 block transposes in LLVM vector shuffles, for the mixed-batch kernels (kernel.py).

numba compiles a transposing loop to one scalar load and store per element (about 1 ns each
here); the classic AVX sequence (unpack pairs of rows, shuffle pairs of pairs, swap 128-bit
halves: 24 shuffles for 64 elements) moves a block in a few nanoseconds. LLVM picks the
instructions from `shufflevector` with constant masks, so this is plain LLVM IR, portable to
any target LLVM vectorises for.

`transpose8(src, src_stride, dst, dst_stride, accumulate)`: dst[c, r] = src[r, c] (or +=) for
r, c < 8; src and dst are addresses of float32 data (`array.ctypes.data` plus an offset), the
strides count floats. The caller keeps every address of the block inside its arrays.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_I64 = ir.IntType(64)
_LO_PAIRS, _HI_PAIRS = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
_LO_QUADS, _HI_QUADS = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
_LO_HALVES, _HI_HALVES = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]


def _shuffle(builder, a, b, mask):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), 8), mask))


def _columns(builder, rows):
    """The eight columns of the block whose rows are `rows` (<8 x float> each)."""
    pairs = []
    for k in range(0, 8, 2):
        pairs += [_shuffle(builder, rows[k], rows[k + 1], _LO_PAIRS), _shuffle(builder, rows[k], rows[k + 1], _HI_PAIRS)]
    quads = []
    for a, b in ((0, 2), (1, 3), (4, 6), (5, 7)):
        quads += [_shuffle(builder, pairs[a], pairs[b], _LO_QUADS), _shuffle(builder, pairs[a], pairs[b], _HI_QUADS)]
    return ([_shuffle(builder, quads[k], quads[k + 4], _LO_HALVES) for k in range(4)]
            + [_shuffle(builder, quads[k], quads[k + 4], _HI_HALVES) for k in range(4)])


def _row_pointers(builder, address, stride):
    vector = ir.VectorType(ir.FloatType(), 8).as_pointer()
    return [builder.inttoptr(builder.add(address, builder.mul(ir.Constant(_I64, 4 * r), stride)), vector)
            for r in range(8)]


@intrinsic
def transpose8(typingctx, src, src_stride, dst, dst_stride, accumulate):
    sig = types.void(types.int64, types.int64, types.int64, types.int64, types.boolean)

    def codegen(context, builder, signature, args):
        src_address, src_stride, dst_address, dst_stride, add = args
        columns = _columns(builder, [builder.load(p, align=4) for p in _row_pointers(builder, src_address, src_stride)])
        for p, column in zip(_row_pointers(builder, dst_address, dst_stride), columns):
            with builder.if_else(add) as (then, otherwise):
                with then:
                    builder.store(builder.fadd(builder.load(p, align=4), column), p, align=4)
                with otherwise:
                    builder.store(column, p, align=4)
        return context.get_dummy_value()

    return sig, codegen
