"""Where diff pruning's gate logits are heading, for a density controller that looks ahead.

The budget, the exact top-k and the density controller that diff pruning shares with every
pruning method live in `diffprune.pruning`.
"""

from __future__ import annotations

from typing import Iterator

import torch


class LogitTrend:
    """Where each gate logit is heading: its recent velocity, for a controller that steers on the
    density a few tens of steps ahead instead of the density now.

    The density lags the penalty: a gate logit falls at most about one gate learning rate per
    Adam step, and from its start (5) it crosses most of the way to the stretch's dead zone
    before its P(z != 0) moves much. A controller that waits for the density keeps raising
    lambda all that while, and when the gates arrive they close together (the collapses in
    benchmarks/README.md). Their velocity shows at once. It is kept as an exponential moving
    average e of the logits, in `averages` (the caller's storage, one tensor per logit tensor,
    updated in place: model buffers, so that a checkpoint carries them); for a logit moving at a
    constant v per step, a - e = v * beta / (1 - beta), so a + H * v = a + H * (1 - beta) / beta * (a - e).
    """

    def __init__(self, logits: list[torch.Tensor], averages: list[torch.Tensor], beta: float = 0.9) -> None:
        if [a.shape for a in logits] != [e.shape for e in averages]:
            raise ValueError("each gate logit tensor needs an average of its shape")
        self.logits, self.average, self.beta = logits, averages, beta

    @torch.no_grad()
    def restart(self) -> None:
        """Velocity zero: the average is the logits now."""
        for average, logit in zip(self.average, self.logits):
            average.copy_(logit)

    @torch.no_grad()
    def update(self) -> None:
        for average, logit in zip(self.average, self.logits):
            average.lerp_(logit, 1 - self.beta)

    @torch.no_grad()
    def ahead(self, steps: int) -> Iterator[torch.Tensor]:
        """The logits `steps` steps ahead at their present velocity, one tensor at a time."""
        scale = steps * (1 - self.beta) / self.beta
        for average, logit in zip(self.average, self.logits):
            yield logit + scale * (logit - average)
