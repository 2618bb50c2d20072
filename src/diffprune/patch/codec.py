"""Compact codes for the positions of a tensor's nonzero entries.

A sparse diff is (positions, values). Values cost a fixed 16 or 32 bits each, so positions are
where the file size is won or lost: stored naively as int64 they would cost 4x the values. A set
of k positions out of n carries log2 C(n, k) bits of information (about k * (log2(n/k) + 1.44)),
and Elias-Fano comes within ~2 bits per entry of that with trivially vectorised numpy code.

Each tensor gets whichever codec is smallest (decided from (numel, nnz) alone, see
`choose_codec`, so `info()` can report sizes without encoding):

* "elias-fano": split each position into L = floor(log2(n/k)) low bits, packed verbatim, and a
  high part h_i = p_i >> L stored in unary as a bitvector with bit h_i + i set
  (length k + (n >> L) + 1). Data = low bytes followed by high bytes.
* "bitmask": one bit per entry, wins from roughly 1/4 density up.
* "elias-fano-complement": Elias-Fano of the positions NOT in the set. A mask that switches off
  90% of a tensor's entries is a dense set, and its complement a sparse one: coding the
  complement makes a set of k of n positions cost about log2 C(n, k) = log2 C(n, n - k) bits
  whichever side is larger, where the bitmask would spend n.
* "all": every entry is set (zero bytes). "none": no entry is set (zero bytes).

Bits are packed MSB first (np.packbits' default). Decoding validates everything, because the
bytes come from a file that may be truncated or corrupt: a wrong length, an unexpected set bit,
a wrong count or positions that are not strictly increasing inside [0, numel) all raise
DiffpruneError instead of silently yielding a wrong patch.
"""

from __future__ import annotations

import math

import numpy as np

from diffprune.errors import DiffpruneError

CODECS = ("elias-fano", "bitmask", "elias-fano-complement", "all", "none")


def information_bound_bits(numel: int, nnz: int) -> float:
    """log2 C(numel, nnz): the fewest bits any code can spend on a set of nnz positions out of numel."""
    if numel < 0 or nnz < 0 or nnz > numel:
        raise DiffpruneError(f"cannot choose {nnz} positions out of {numel}")
    ln = math.lgamma(numel + 1) - math.lgamma(nnz + 1) - math.lgamma(numel - nnz + 1)
    return max(0.0, ln / math.log(2))


def _ef_low_bits(numel: int, nnz: int) -> int:
    # floor(log2(n / k)) in exact integer arithmetic: floor(log2(x)) == floor(log2(floor(x))) for x >= 1.
    return (numel // nnz).bit_length() - 1


def _ef_sizes(numel: int, nnz: int) -> tuple[int, int, int, int]:
    """(L, low byte count, high bit count, high byte count) of an Elias-Fano code."""
    low_bits = _ef_low_bits(numel, nnz)
    high_bits = nnz + (numel >> low_bits) + 1
    return low_bits, (nnz * low_bits + 7) // 8, high_bits, (high_bits + 7) // 8


def codec_size(codec: str, numel: int, nnz: int) -> int:
    """Bytes that `codec` spends on nnz positions out of numel; raises if the codec cannot code them."""
    if codec == "none":
        if nnz:
            raise DiffpruneError(f"codec 'none' cannot code {nnz} positions")
        return 0
    if codec == "all":
        if nnz != numel:
            raise DiffpruneError(f"codec 'all' needs nnz == numel, got {nnz} of {numel}")
        return 0
    if codec == "bitmask":
        return (numel + 7) // 8
    if codec == "elias-fano":
        if nnz == 0:
            raise DiffpruneError("codec 'elias-fano' needs at least one position")
        _, low_bytes, _, high_bytes = _ef_sizes(numel, nnz)
        return low_bytes + high_bytes
    if codec == "elias-fano-complement":
        if nnz == numel:
            raise DiffpruneError("codec 'elias-fano-complement' needs at least one position left out")
        return codec_size("elias-fano", numel, numel - nnz)
    raise DiffpruneError(f"unknown position codec '{codec}' (known: {', '.join(CODECS)})")


def choose_codec(numel: int, nnz: int) -> tuple[str, int]:
    """The smallest codec for nnz positions out of numel and its size in bytes. Ties go to
    Elias-Fano, then the bitmask (the order of CODECS), so files written before the complement
    code existed are written the same way today."""
    if nnz < 0 or nnz > numel:
        raise DiffpruneError(f"cannot choose {nnz} positions out of {numel}")
    if nnz == 0:
        return "none", 0
    if nnz == numel:
        return "all", 0
    sizes = [(codec_size(c, numel, nnz), i, c) for i, c in enumerate(CODECS[:3])]
    size, _, codec = min(sizes)
    return codec, size


def _check_positions(positions: np.ndarray, numel: int) -> np.ndarray:
    positions = np.asarray(positions)
    if positions.ndim != 1 or (positions.size and not np.issubdtype(positions.dtype, np.integer)):
        raise DiffpruneError("positions must be a one-dimensional integer array")
    positions = positions.astype(np.int64, copy=False)
    if positions.size and (positions[0] < 0 or positions[-1] >= numel or np.any(positions[1:] <= positions[:-1])):
        raise DiffpruneError(f"positions must be strictly increasing flat indices in [0, {numel})")
    return positions


def encode_positions(positions: np.ndarray, numel: int, *, codec: str | None = None) -> tuple[str, np.ndarray]:
    """Sorted unique flat indices -> (codec name, uint8 bytes). `codec` forces one (tests, debugging)."""
    positions = _check_positions(positions, numel)
    nnz = positions.size
    if codec is None:
        codec, _ = choose_codec(numel, nnz)
    else:
        codec_size(codec, numel, nnz)  # raises if the forced codec cannot code these positions
    if codec in ("none", "all"):
        return codec, np.zeros(0, dtype=np.uint8)
    if codec == "bitmask":
        mask = np.zeros(numel, dtype=np.uint8)
        mask[positions] = 1
        return codec, np.packbits(mask)
    if codec == "elias-fano-complement":
        return codec, _encode_elias_fano(_complement(positions, numel), numel)
    return codec, _encode_elias_fano(positions, numel)


def _complement(positions: np.ndarray, numel: int) -> np.ndarray:
    """The sorted flat indices in [0, numel) that `positions` (sorted, unique, in range) leaves out."""
    keep = np.ones(numel, dtype=bool)
    keep[positions] = False
    return np.flatnonzero(keep).astype(np.int64)


def _encode_elias_fano(positions: np.ndarray, numel: int) -> np.ndarray:
    nnz = positions.size
    low_bits, _, high_bits, _ = _ef_sizes(numel, nnz)
    # Low parts: an (nnz, L) matrix of bits, MSB first, flattened and packed.
    shifts = np.arange(low_bits - 1, -1, -1, dtype=np.int64)
    low = ((positions[:, None] >> shifts) & 1).astype(np.uint8)
    # High parts in unary: the i-th set bit sits at (p_i >> L) + i, so gaps count the increments.
    high = np.zeros(high_bits, dtype=np.uint8)
    high[(positions >> low_bits) + np.arange(nnz, dtype=np.int64)] = 1
    return np.concatenate([np.packbits(low.reshape(-1)), np.packbits(high)])


def decode_positions(codec: str, data: np.ndarray, numel: int, nnz: int) -> np.ndarray:
    """(codec, bytes) -> int64 sorted flat indices; raises DiffpruneError if the bytes are not a valid code."""
    if numel < 0 or nnz < 0 or nnz > numel:
        raise DiffpruneError(f"cannot decode {nnz} positions out of {numel}")
    data = np.asarray(data)
    if data.ndim != 1 or data.dtype != np.uint8:
        raise DiffpruneError("encoded positions must be a one-dimensional uint8 array")
    expected = codec_size(codec, numel, nnz)  # also rejects unknown codecs and impossible counts
    if data.size != expected:
        raise DiffpruneError(
            f"{codec} positions for {nnz} of {numel} entries take {expected} bytes, found {data.size}"
        )
    if codec == "none":
        return np.zeros(0, dtype=np.int64)
    if codec == "all":
        return np.arange(numel, dtype=np.int64)
    if codec == "bitmask":
        # Unpack the padding bits too: a set padding bit is corruption, caught by the range check.
        positions = np.flatnonzero(np.unpackbits(data)).astype(np.int64)
        if positions.size != nnz:
            raise DiffpruneError(f"bitmask has {positions.size} set bits, expected {nnz}")
        _check_decoded(codec, positions, numel)
        return positions
    if codec == "elias-fano-complement":
        # The left-out positions are validated like any Elias-Fano code, so their complement is
        # exactly nnz sorted unique indices: nothing more to check.
        return _complement(_decode_elias_fano(data, numel, numel - nnz), numel)
    return _decode_elias_fano(data, numel, nnz)


def _decode_elias_fano(data: np.ndarray, numel: int, nnz: int) -> np.ndarray:
    low_bits, low_bytes, high_bits, _ = _ef_sizes(numel, nnz)
    pad = low_bytes * 8 - nnz * low_bits
    if pad and data[low_bytes - 1] & ((1 << pad) - 1):
        raise DiffpruneError("elias-fano low bits have set padding bits")
    ones = np.flatnonzero(np.unpackbits(data[low_bytes:])).astype(np.int64)
    if ones.size != nnz or ones[-1] >= high_bits:
        raise DiffpruneError(f"elias-fano high bits do not hold {nnz} positions")
    high = ones - np.arange(nnz, dtype=np.int64)
    bits = np.unpackbits(data[:low_bytes], count=nnz * low_bits).reshape(nnz, low_bits).astype(np.int64)
    weights = np.int64(1) << np.arange(low_bits - 1, -1, -1, dtype=np.int64)
    positions = (high << low_bits) | (bits @ weights)
    _check_decoded("elias-fano", positions, numel)
    return positions


def _check_decoded(codec: str, positions: np.ndarray, numel: int) -> None:
    if positions.size and (positions[-1] >= numel or np.any(positions[1:] <= positions[:-1])):
        raise DiffpruneError(f"decoded {codec} positions are not strictly increasing indices below {numel}")
