"""The compact in-memory form of "add" changes (patch/compact.py): exact round trips, and
applying and reverting from it bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_bert
from diffprune.base import load_base
from diffprune.errors import DiffpruneError
from diffprune.patch.apply import apply_patch
from diffprune.patch.compact import CHECK_ROWS, CompactDiffs, CompactPatch
from diffprune.patch.kinds import SparseDiff
from diffprune.serving.synthetic import random_patch


def diffs(values: torch.dtype = torch.float16) -> dict[str, SparseDiff]:
    """Positions of every gap size (0, one, two and three varint bytes, the last entry of a
    tensor), an empty tensor, a vector and a 3-d tensor; values exact in `values`."""
    g = torch.Generator().manual_seed(0)
    big = torch.tensor([0, 1, 2, 130, 20000, 20001, 2_000_000, 4 * 10**6 - 1])
    out = {"big": (big, (2000, 2000)), "empty": (torch.zeros(0, dtype=torch.int64), (7, 5)),
           "vector": (torch.tensor([3, 9]), (10,)), "cube": (torch.randperm(60, generator=g)[:9].sort().values, (3, 4, 5)),
           "rows": (torch.randperm(300 * 8, generator=g)[:200].sort().values, (300, 8))}
    return {n: SparseDiff(shape, pos, (torch.randn(pos.numel(), generator=g) * 0.1).to(values).float())
            for n, (pos, shape) in out.items()}


def assert_same(got: dict[str, SparseDiff], want: dict[str, SparseDiff]) -> None:
    assert list(got) == list(want)
    for n, d in want.items():
        assert got[n].shape == d.shape and got[n].kind == d.kind, n
        assert torch.equal(got[n].positions, d.positions) and torch.equal(got[n].values, d.values), n


@pytest.mark.parametrize("stored, asked, kept", [(torch.float16, torch.float16, torch.float16),
                                                 (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float16, torch.float32),
                                                 (torch.float32, torch.float32, torch.float32)])
def test_the_compact_form_gives_back_every_diff_bit_for_bit(stored, asked, kept):
    want = diffs(stored)
    c = CompactDiffs.of(want, asked, {"rows"})
    assert c.value_dtype == kept  # values the asked dtype would round are kept as float32
    assert c.nnz == sum(d.nnz for d in want.values())
    assert c.bits.nbytes == c.nnz * (4 if kept == torch.float32 else 2)
    assert c.nbytes == c.stream.nbytes + c.bits.nbytes + c.table.nbytes + c.checks.nbytes
    assert_same(c.sparse_diffs(), want)


def test_checkpoints_start_decoding_at_their_block():
    d = diffs()["rows"]
    c = CompactDiffs.of({"rows": d}, torch.float16, {"rows"})
    assert c.checkpointed("rows")
    from diffprune.patch.compact import kernels

    k = kernels()
    block = CHECK_ROWS * d.shape[-1]
    positions = d.positions.numpy()
    for row, (byte, entry, prev) in enumerate(c.checks):
        first = int((positions < row * block).sum())
        assert entry == first and prev == (positions[first - 1] if first else -1)
        assert k.next_position(c.stream, byte, prev)[0] == positions[first]


@pytest.mark.parametrize("code, dtype", [(0, np.float16), (1, None)])
def test_every_16_bit_pattern_widens_to_its_exact_value(code, dtype):
    """The kernels' arithmetic conversion against numpy's, all 65536 patterns, bit for bit."""
    import numba as nb

    from diffprune.patch.compact import kernels, powers_of_two

    widen = kernels().widen

    @nb.njit
    def every(bits, code, pow2):
        return np.array([widen(h, code, pow2) for h in bits], np.float32)

    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    want = bits.view(dtype).astype(np.float32) if dtype else (bits.astype(np.uint32) << 16).view(np.float32)
    got = every(bits, code, powers_of_two())
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan) and np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_only_add_changes_are_kept_compact():
    off = SparseDiff.from_mask(torch.tensor([True, False, True]))
    with pytest.raises(DiffpruneError, match="'mask': only 'add' changes are kept compact"):
        CompactDiffs.of({"m": off})
    with pytest.raises(DiffpruneError, match="float16, bfloat16 or float32"):
        CompactDiffs.of({}, torch.int8)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return load_base(str(tiny_bert(tmp_path_factory.mktemp("compact-bert") / "m", dropout=0.0)), 2)


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 10**6])
def test_a_work_split_covers_every_entry_once_in_order_in_balanced_parts(parts):
    from diffprune.patch import compact_kernels as k

    c = CompactDiffs.of(diffs(), torch.float32)
    work, bounds = k.split(c.stream, c.table, parts)
    assert bounds.size == parts + 1 and bounds[0] == 0 and bounds[-1] == len(work)
    runs = [(t, e, end) for t, _, e, end, _ in work]
    assert [e for _, e, _ in runs] == [0] + [end for _, _, end in runs[:-1]] and runs[-1][2] == c.nnz
    sizes = [int((work[a:b, k.W_END] - work[a:b, k.W_ENTRY]).sum()) for a, b in zip(bounds[:-1], bounds[1:])]
    assert max(sizes) - min(sizes) <= 1
    for t, byte, e, end, prev in work:  # each run decodes its own entries from where it starts
        whole = c.positions(t)
        first = e - c.table[t, 1]
        assert prev == (whole[first - 1] if first else -1)
        got = _decode_from(k, c.stream, byte, prev, end - e)
        assert np.array_equal(got, whole[first: first + end - e])


def _decode_from(k, stream, byte, prev, n):
    out = []
    for _ in range(n):
        prev, byte = k.next_position(stream, byte, prev)
        out.append(prev)
    return np.array(out, np.int64)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_compact_patch_applies_as_its_task_patch_and_reverts_bit_for_bit(base, dtype, threads, monkeypatch):
    from diffprune.patch import apply

    monkeypatch.setattr(apply, "PARALLEL_ENTRIES", 0)  # every apply on `threads` threads
    monkeypatch.setattr(apply, "kernel_threads", lambda: threads)
    patch = random_patch(base, 0.05, 2, scale=0.3)
    for d in patch.diffs.values():
        d.values = d.values.to(dtype).float()
    first = next(iter(patch.diffs))
    patch.diffs[first] = SparseDiff(patch.diffs[first].shape, torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    compact = CompactPatch(CompactDiffs.of(patch.diffs, dtype), patch.head, patch.meta, "t")
    assert compact.diffs.value_dtype == dtype
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    for _ in range(2):  # the second apply reuses what the first prepared
        with apply_patch(compact, base, head=False):
            patched = {n: p.detach().clone() for n, p in base.model.named_parameters()}
        assert all(torch.equal(p, before[n]) for n, p in base.model.named_parameters())
    for n, d in patch.diffs.items():  # each entry: the base entry plus the value, rounded once
        want = before[n].reshape(-1).clone()
        want[d.positions] = want[d.positions] + d.values
        assert torch.equal(patched[n].reshape(-1), want), n
    with apply_patch(patch, base, head=False):  # the TaskPatch writes the very same bits
        assert all(torch.equal(p, patched[n]) for n, p in base.model.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in base.model.named_parameters())


def test_a_compact_patch_of_another_shape_is_refused_with_the_reason(base):
    name = "bert.encoder.layer.0.attention.self.query.weight"
    patch = random_patch(base, 0.05, 2, tensors=[name])
    d = patch.diffs[name]
    wrong = CompactDiffs.of({name: SparseDiff((d.shape[0] // 2, d.shape[1] * 2), d.positions, d.values)})
    with pytest.raises(DiffpruneError, match="does not fit the model: it changes '.*query.weight' of shape"):
        apply_patch(CompactPatch(wrong, patch.head, patch.meta, "t"), base, head=False)
