"""Timing models and layers as a user running one of them sees them, while comparing several."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# Each model runs BLOCK calls in a row, of which the first SETTLE are not counted: they pay for
# the model before (torch's OpenMP threads spin for milliseconds after its last op, on the cores
# the next one needs; measured: a fused 95% MiniLM after a dense one, 8.8 instead of 6.5 ms).
BLOCK, SETTLE = 5, 2


def time_in_blocks(calls: dict[str, Callable[[], object]], repeats: int = 30,
                   warmup_rounds: int = 1) -> dict[str, list[float]]:
    """Each call's times (ms), `repeats` of them, as a user running one model sees them: in
    blocks of BLOCK consecutive calls, the blocks of the calls alternating round after round
    (load from other work falls on all alike), each round starting one call later (none always
    follows the same other one), the first SETTLE calls of each block and the first
    `warmup_rounds` rounds left out."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names, per_block = list(calls), BLOCK - SETTLE
    rounds = warmup_rounds + -(-repeats // per_block)
    with torch.no_grad():
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                for i in range(BLOCK):
                    start = time.perf_counter()
                    calls[name]()
                    if r >= warmup_rounds and i >= SETTLE and len(times[name]) < repeats:
                        times[name].append((time.perf_counter() - start) * 1e3)
    return times


def token_inputs(vocab_size: int, batch_size: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids drawn from the vocabulary (speed does not depend on which) and a full mask."""
    ids = torch.randint(0, vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
