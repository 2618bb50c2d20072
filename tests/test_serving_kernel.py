"""The mixed-batch Linear kernel (serving/kernel.py) against dense arithmetic, on shapes that take
each of its paths: whole 64-token tiles of widths a multiple of 8 (shuffled 8 x 8 blocks, sparse/tiles.py),
other widths, and a last partial tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffprune.patch.compact import CompactDiffs
from diffprune.patch.kinds import SparseDiff
from diffprune.serving import kernel


def task(n_in: int, n_out: int, seed: int, dtype: torch.dtype) -> tuple[CompactDiffs, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, n_in, generator=g) * (torch.rand(n_out, n_in, generator=g) < 0.1)
    bias = torch.randn(n_out, generator=g) * (torch.rand(n_out, generator=g) < 0.3)
    weight, bias = weight.to(dtype).float(), bias.to(dtype).float()
    diffs = {"w": SparseDiff.from_dense(weight), "b": SparseDiff.from_dense(bias)}
    return CompactDiffs.of(diffs, dtype), weight, bias


@pytest.mark.parametrize("tokens, n_in, n_out", [(64, 40, 24), (130, 24, 17), (5, 16, 8), (70, 13, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_linear_kernel_writes_the_base_bias_and_each_rows_own_delta(tokens, n_in, n_out, dtype):
    tasks = [task(n_in, n_out, seed, dtype) for seed in range(3)]
    row_slots = np.array([0, 2, 1, 2], np.int64)
    weight_t = np.array([0, 0, -1], np.int64)  # slot 2 changes only the bias
    bias_t = np.array([1, -1, 1], np.int64)  # slot 1 only the weight
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(4, tokens, n_in, generator=g), torch.full((4, tokens, n_out), float("nan"))
    base_bias = torch.randn(n_out, generator=g)
    want = base_bias.expand(4, tokens, n_out).clone()
    for r, s in enumerate(row_slots):
        _, weight, bias = tasks[s]
        want[r] += (x[r] @ weight.T if weight_t[s] >= 0 else 0) + (bias if bias_t[s] >= 0 else 0)
    slots = kernel.Slots([c for c, _, _ in tasks])
    kernel.run(kernel.linear_delta, x.numpy(), y.numpy(), row_slots, weight_t, bias_t, slots.streams, slots.bits,
               slots.codes, slots.tables, slots.pow2, base_bias.numpy(), scratch_floats=(n_in + n_out) * kernel.TILE)
    assert torch.allclose(y, want, atol=1e-5)  # every entry written: none of the NaN it held is left


def test_the_linear_kernel_refuses_activations_it_cannot_address():
    c, _, _ = task(16, 8, 0, torch.float32)
    slots, x, y = kernel.Slots([c]), torch.randn(1, 8, 16), torch.randn(1, 8, 8)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel.run(kernel.linear_delta, x.numpy()[:, ::2], y.numpy()[:, ::2], np.zeros(1, np.int64),
                   np.zeros(1, np.int64), np.full(1, -1, np.int64), slots.streams, slots.bits, slots.codes,
                   slots.tables, slots.pow2, np.zeros(8, np.float32), scratch_floats=24 * kernel.TILE)
