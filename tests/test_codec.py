"""Position codecs: exact round trips, near-optimal size, and refusal of corrupt bytes."""

import math

import numpy as np
import pytest

from diffprune.errors import DiffpruneError
from diffprune.patch.codec import choose_codec, decode_positions, encode_positions, information_bound_bits


def _random_positions(numel, nnz, seed=0):
    return np.sort(np.random.default_rng(seed).choice(numel, size=nnz, replace=False)).astype(np.int64)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.005, 0.3, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("numel", [1000, 12_345])
def test_round_trip_random(numel, density):
    positions = _random_positions(numel, round(numel * density), seed=numel)
    codec, data = encode_positions(positions, numel)
    assert data.dtype == np.uint8
    decoded = decode_positions(codec, data, numel, positions.size)
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, positions)


@pytest.mark.parametrize("positions", [[0], [999], [0, 999], [500], list(range(990, 1000))])
def test_round_trip_edges(positions):
    positions = np.array(positions, dtype=np.int64)
    for codec in (None, "elias-fano", "bitmask", "elias-fano-complement"):
        name, data = encode_positions(positions, 1000, codec=codec)
        np.testing.assert_array_equal(decode_positions(name, data, 1000, positions.size), positions)


def test_codec_choice():
    assert encode_positions(np.zeros(0, dtype=np.int64), 50)[0] == "none"
    codec, data = encode_positions(np.arange(50), 50)
    assert (codec, data.size) == ("all", 0)
    assert encode_positions(_random_positions(10_000, 3_000), 10_000)[0] == "bitmask"
    assert encode_positions(_random_positions(10_000, 50), 10_000)[0] == "elias-fano"
    # choose_codec predicts what encode_positions produces without encoding.
    assert encode_positions(_random_positions(10_000, 9_000), 10_000)[0] == "elias-fano-complement"
    for nnz in (1, 10, 100, 1000, 5000, 8000, 9000, 9999):
        codec, data = encode_positions(_random_positions(10_000, nnz), 10_000)
        assert choose_codec(10_000, nnz) == (codec, data.size)


def test_hand_worked_elias_fano():
    # positions 1, 5, 6, 13 of 16: L = floor(log2(16/4)) = 2.
    # low parts 01 01 10 01 -> 0b01011001 = 89.
    # high parts 0, 1, 1, 3 -> bits set at high + i = 0, 2, 3, 6 in 4 + (16 >> 2) + 1 = 9 bits
    # -> 10110010 0(0000000) = 178, 0.
    expected = np.array([1, 5, 6, 13])
    codec, data = encode_positions(expected, 16, codec="elias-fano")
    assert data.tolist() == [89, 178, 0]
    np.testing.assert_array_equal(decode_positions("elias-fano", np.array([89, 178, 0], np.uint8), 16, 4), expected)
    # The bitmask of the same set: 01000110 00000100.
    _, mask = encode_positions(expected, 16, codec="bitmask")
    assert mask.tolist() == [0b01000110, 0b00000100]


def test_elias_fano_near_information_bound():
    numel, nnz = 1_000_000, 5_000
    codec, data = encode_positions(_random_positions(numel, nnz), numel)
    assert codec == "elias-fano"
    assert data.size * 8 <= 1.1 * information_bound_bits(numel, nnz) + 64


def test_information_bound():
    assert information_bound_bits(10, 0) == 0
    assert information_bound_bits(10, 10) == 0
    assert information_bound_bits(10, 3) == pytest.approx(math.log2(120))
    with pytest.raises(DiffpruneError):
        information_bound_bits(3, 4)


def test_encode_rejects_bad_positions():
    for bad in ([3, 2], [1, 1], [-1, 2], [0, 10]):
        with pytest.raises(DiffpruneError):
            encode_positions(np.array(bad), 10)
    with pytest.raises(DiffpruneError):
        encode_positions(np.array([1, 2]), 10, codec="all")


def test_decode_rejects_corrupt_data():
    numel = 5000
    positions = _random_positions(numel, 40)
    codec, data = encode_positions(positions, numel)
    assert codec == "elias-fano"
    with pytest.raises(DiffpruneError, match="bytes"):
        decode_positions(codec, data[:-1], numel, 40)  # truncated
    with pytest.raises(DiffpruneError):
        decode_positions(codec, np.concatenate([data, [0]]).astype(np.uint8), numel, 40)  # too long
    with pytest.raises(DiffpruneError):
        decode_positions(codec, data, numel, 41)  # wrong count
    with pytest.raises(DiffpruneError):
        decode_positions(codec, np.full_like(data, 255), numel, 40)  # garbage
    with pytest.raises(DiffpruneError):
        decode_positions("zip", data, numel, 40)
    _, mask = encode_positions(positions, numel, codec="bitmask")
    flipped = mask.copy()
    flipped[0] ^= 0xFF
    with pytest.raises(DiffpruneError):
        decode_positions("bitmask", flipped, numel, 40)
    with pytest.raises(DiffpruneError):
        decode_positions("all", np.zeros(1, np.uint8), 10, 10)
    with pytest.raises(DiffpruneError):
        decode_positions("none", np.zeros(0, np.uint8), 10, 1)
    assert decode_positions("bitmask", np.zeros(2, np.uint8), 10, 0).size == 0  # a mask with no entries
    with pytest.raises(DiffpruneError):
        decode_positions("bitmask", np.array([1, 0], np.uint8), 10, 0)


def test_decode_rejects_unordered_elias_fano():
    # A valid-length code whose low parts make the sequence decrease: 1, 0 of 8 (L = 2, high 0, 0).
    _, data = encode_positions(np.array([1, 3]), 8, codec="elias-fano")
    low_swapped = np.array([0b11010000, data[1]], np.uint8)  # low parts 3, 1 -> positions 3, 1
    with pytest.raises(DiffpruneError, match="increasing"):
        decode_positions("elias-fano", low_swapped, 8, 2)


def test_hand_worked_elias_fano_complement():
    # positions {0..15} minus {1, 5, 6, 13}: the complement is the hand-worked set above, so the
    # bytes are that set's Elias-Fano code.
    left_out = {1, 5, 6, 13}
    positions = np.array([p for p in range(16) if p not in left_out])
    codec, data = encode_positions(positions, 16, codec="elias-fano-complement")
    assert data.tolist() == [89, 178, 0]
    np.testing.assert_array_equal(decode_positions(codec, data, 16, 12), positions)


@pytest.mark.parametrize("density", [0.5, 0.75, 0.9, 0.99])
def test_dense_sets_cost_about_the_information_bound(density):
    """A mask at 90% sparsity sets 90% of the positions: coded through its complement it costs
    about what the 10% set would, log2 C(n, k) = log2 C(n, n - k), not the bitmask's n bits.
    Elias-Fano spends at most ~2 bits per entry of the smaller side over the bound."""
    numel = 100_000
    nnz = round(numel * density)
    positions = _random_positions(numel, nnz, seed=1)
    codec, data = encode_positions(positions, numel)
    bound = information_bound_bits(numel, nnz)
    assert bound <= data.size * 8 <= bound + 2 * min(nnz, numel - nnz) + 64
    if density >= 0.9:
        assert codec == "elias-fano-complement" and data.size * 8 < 0.6 * numel  # the bitmask: numel bits
        assert data.size == encode_positions(_random_positions(numel, numel - nnz), numel)[1].size
    np.testing.assert_array_equal(decode_positions(codec, data, numel, nnz), positions)
    assert choose_codec(numel, nnz) == (codec, data.size)


def test_complement_rejects_corrupt_data():
    numel = 5000
    positions = _random_positions(numel, numel - 40)
    codec, data = encode_positions(positions, numel)
    assert codec == "elias-fano-complement"
    with pytest.raises(DiffpruneError, match="bytes"):
        decode_positions(codec, data[:-1], numel, positions.size)  # truncated
    with pytest.raises(DiffpruneError):
        decode_positions(codec, data, numel, positions.size - 1)  # wrong count
    with pytest.raises(DiffpruneError):
        decode_positions(codec, np.full_like(data, 255), numel, positions.size)  # garbage
    with pytest.raises(DiffpruneError):
        encode_positions(np.arange(numel), numel, codec="elias-fano-complement")  # nothing left out
    rng = np.random.default_rng(0)
    for _ in range(200):  # any one flipped byte is refused or decodes to nnz sorted unique positions
        damaged = data.copy()
        damaged[rng.integers(data.size)] ^= rng.integers(1, 256)
        try:
            decoded = decode_positions(codec, damaged, numel, positions.size)
        except DiffpruneError:
            continue
        assert decoded.size == positions.size and np.all(np.diff(decoded) > 0) and decoded[-1] < numel
