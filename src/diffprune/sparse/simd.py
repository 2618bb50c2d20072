"""Vector code numba does not write by itself, as LLVM IR: 8 x 8 float32 block transposes in
vector shuffles (for the sparse kernel and the mixed-batch kernels), and the sparse kernel's
inner loop over one output row of a token tile.

numba compiles a transposing loop to one scalar load and store per element (about 1 ns each
here); the classic AVX sequence (unpack pairs of rows, shuffle pairs of pairs, swap 128-bit
halves: 24 shuffles for 64 elements) moves a block in a few nanoseconds. LLVM picks the
instructions from `shufflevector` with constant masks, so this is plain LLVM IR, portable to
any target LLVM vectorises for.

`transpose8(src, src_stride, dst, dst_stride, accumulate)`: dst[c, r] = src[r, c] (or +=) for
r, c < 8; src and dst are addresses of float32 data (`array.ctypes.data` plus an offset), the
strides count floats. The caller keeps every address of the block inside its arrays.

`ROW_TILE[(vectors, index_bytes)](xt, indices, values, k0, k1, bias, out)`: out[0 : 16 * vectors]
= bias + sum over k in [k0, k1) of values[k] * xt[indices[k], :], where xt holds rows of
16 * vectors floats. numba vectorises such a loop over the tile's tokens, but keeps the sums in
memory, loading and storing them around every entry, and tests the arrays for overlap each
time; here they stay in vector registers for the whole row, in four independent chains of
fused multiply-adds (entries k, k + 1, k + 2, k + 3), summed at the row's end.
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


_F32 = ir.FloatType()
_LANES = 16
_VEC = ir.VectorType(_F32, _LANES)
UNROLL = 4  # entries per step, each into its own accumulators


def _row_tile(vectors: int, index_bytes: int):
    @intrinsic
    def row_tile(typingctx, xt, indices, values, k0, k1, bias, out):
        sig = types.void(types.int64, types.int64, types.int64, types.int64, types.int64, types.float32, types.int64)

        def codegen(context, builder, signature, args):
            _RowTile(builder, vectors, index_bytes).emit(*args)
            return context.get_dummy_value()

        return sig, codegen

    return row_tile


class _RowTile:
    """Emits one row_tile: a loop of UNROLL entries a step, a loop of one for the rest, the store."""

    def __init__(self, builder, vectors: int, index_bytes: int) -> None:
        self.b, self.vectors, self.index_bytes = builder, vectors, index_bytes
        self.fma = builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(_VEC, [_VEC] * 3))

    def const(self, n: int):
        return ir.Constant(_I64, n)

    def splat(self, value):
        undef = ir.Constant(_VEC, ir.Undefined)
        one = self.b.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
        return self.b.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES))

    def pointer(self, address, offset, kind):
        return self.b.inttoptr(self.b.add(address, offset), kind.as_pointer())

    def accumulate(self, k, sums):
        """sums (one per vector of the row) + values[k] * xt[indices[k], :]."""
        b, index_type = self.b, ir.IntType(8 * self.index_bytes)
        i = b.sext(b.load(self.pointer(self.indices, b.mul(k, self.const(self.index_bytes)), index_type),
                          align=self.index_bytes), _I64)
        w = self.splat(b.load(self.pointer(self.values, b.mul(k, self.const(4)), _F32), align=4))
        row = b.mul(i, self.const(4 * _LANES * self.vectors))
        return [b.call(self.fma, [w, b.load(self.pointer(self.xt, b.add(row, self.const(64 * v)), _VEC), align=4), s])
                for v, s in enumerate(sums)]

    def loop(self, name, start, step, limit, inits, body):
        """for (k = start; k + step <= limit; k += step) sums = body(k, sums); gives (k, sums) after."""
        b = self.b
        before = b.block
        head, after = b.append_basic_block(f"{name}_body"), b.append_basic_block(f"{name}_after")
        b.cbranch(b.icmp_signed("<=", b.add(start, self.const(step)), limit), head, after)
        b.position_at_end(head)
        k = b.phi(_I64)
        sums = [b.phi(_VEC) for _ in inits]
        new, k_next = body(k, sums), b.add(k, self.const(step))
        end = b.block
        b.cbranch(b.icmp_signed("<=", b.add(k_next, self.const(step)), limit), head, after)
        b.position_at_end(after)
        k_out, outs = b.phi(_I64), [b.phi(_VEC) for _ in inits]
        for phi, out, first, then in [(k, k_out, start, k_next), *zip(sums, outs, inits, new)]:
            for node in (phi, out):
                node.add_incoming(first, before)
                node.add_incoming(then, end)
        return k_out, outs

    def emit(self, xt, indices, values, k0, k1, bias, out):
        self.xt, self.indices, self.values = xt, indices, values
        n = self.vectors
        zero = ir.Constant(_VEC, [0.0] * _LANES)

        def step(k, sums):
            return [s for u in range(UNROLL)
                    for s in self.accumulate(self.b.add(k, self.const(u)), sums[u * n:(u + 1) * n])]

        k, sums = self.loop("step", k0, UNROLL, k1, [self.splat(bias)] * n + [zero] * (n * (UNROLL - 1)), step)
        total = sums[:n]
        for u in range(1, UNROLL):
            total = [self.b.fadd(a, c) for a, c in zip(total, sums[u * n:(u + 1) * n])]
        _, total = self.loop("rest", k, 1, k1, total, self.accumulate)
        for v, vector in enumerate(total):
            self.b.store(vector, self.pointer(out, self.const(64 * v), _VEC), align=4)


# (vectors of 16 floats a tile row, bytes of a column index) -> intrinsic
# (1 and 2: the sparse kernel's tiles of 16 and 32 tokens; 4: the mixed-batch kernel's 64)
ROW_TILE = {(vectors, index_bytes): _row_tile(vectors, index_bytes) for vectors in (1, 2, 4) for index_bytes in (2, 4)}
