"""The budget: how many entries a patch keeps, which ones (exact top-k), and a density controller."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from diffprune.errors import DiffpruneError


def budget_count(budget: float, base_params: int) -> int:
    """A fraction of the base parameters (budget < 1) or an absolute count (budget >= 1)."""
    if budget <= 0:
        raise DiffpruneError("--budget must be positive (a fraction like 0.005 or a count like 100000)")
    k = round(budget * base_params) if budget < 1 else int(budget)
    return max(1, min(k, base_params))


def budget_fraction(budget: float, base_params: int) -> float:
    """The budget as a fraction of the base parameters, as given when it is one (not rounded to k)."""
    return budget if budget < 1 else budget / base_params


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the k largest scores; ties at the threshold go to the lowest
    indices, so the choice is deterministic (torch.topk's tie order is not specified)."""
    flat = scores.reshape(-1)
    if k >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device)
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest
    above = (flat > threshold).nonzero().squeeze(1)
    ties = (flat == threshold).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def project(deltas: list[torch.Tensor], k: int, scope: str) -> torch.Tensor:
    """Global positions (into the concatenated tensors) of the k entries of largest |delta|.

    scope "global": one threshold over all tensors (the paper); "per-tensor": every tensor keeps
    the same fraction, rounded so that the counts still sum to exactly k.
    """
    sizes = [d.numel() for d in deltas]
    if scope == "global":
        return top_k(torch.cat([d.detach().abs().reshape(-1) for d in deltas]), k)
    if scope != "per-tensor":
        raise DiffpruneError(f"unknown budget scope '{scope}'; choose global or per-tensor")
    quotas = _apportion(sizes, k)
    chosen, start = [], 0
    for delta, quota, size in zip(deltas, quotas, sizes):
        if quota:
            chosen.append(top_k(delta.detach().abs().reshape(-1), quota) + start)
        start += size
    return torch.cat(chosen)


def _apportion(sizes: list[int], k: int) -> list[int]:
    """Largest-remainder split of k in proportion to sizes (sums to exactly k)."""
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    quotas = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: k - sum(quotas)]:
        quotas[i] += 1
    return quotas


def cubic_schedule(step: int, total_steps: int, start: float, target: float, begin: float, reach: float) -> float:
    """`start` until `begin` (a fraction of the steps), then a cubic fall (Zhu and Gupta 2017),
    fast first and slow near the end, to `target` at `reach`, held from there."""
    span = max(1.0, (reach - begin) * total_steps)
    t = min(1.0, max(0.0, step - begin * total_steps) / span)
    return target + (start - target) * (1 - t) ** 3


def keep_largest(tensors: list[torch.Tensor], count: int) -> None:
    """Zero, in place, every entry of `tensors` whose magnitude is below the `count`-th largest
    over all of them (ties at that magnitude stay: the projection settles the exact count)."""
    total = sum(t.numel() for t in tensors)
    if count >= total:
        return
    magnitudes = torch.cat([t.detach().abs().reshape(-1) for t in tensors])
    threshold = torch.kthvalue(magnitudes, total - count + 1).values
    for t, magnitude in zip(tensors, magnitudes.split([t.numel() for t in tensors])):
        t.detach().masked_fill_(magnitude.view_as(t) < threshold, 0.0)


@dataclass
class DensityController:
    """Steers the L0 penalty weight so the expected density follows a schedule to `target`.

    The penalty's useful size depends on the model, the task and the optimiser (Adam rescales
    each coordinate), so no fixed lambda fits every model: the paper's BERT-large value closes
    every gate of a small model on RTE. Instead lambda moves multiplicatively, up while the
    density is above its scheduled value and down while below, so the L0 phase ends near the
    target density on any model and task.

    The schedule holds the gates open for the first `begin` fraction of the phase (no penalty):
    w starts at zero, so until it has learned something the task cannot tell the gates which
    entries matter, and a penalty acting from the first step closes them nearly at random. It
    then falls cubically (Zhu and Gupta 2017) to the target at `reach`, and holds. Lambda falls
    faster than it rises: with Adam, every gate the task does not defend closes at the full
    learning rate once the penalty outweighs Adam's epsilon, so overshoot must be stopped fast.

    `reachable` (a function of the penalised steps so far) floors the schedule at the lowest
    density the gates can reach: a gate logit moves about one learning rate per Adam step, so
    from logit a0 the density cannot fall faster than P(z != 0) at a0 - lr * t. Without the
    floor, the schedule outruns the gates for most of its span, the error stays positive
    whatever they do, and lambda winds up by orders of magnitude before the density answers.
    """

    target: float
    start: float
    total_steps: int
    begin: float = 0.25
    reach: float = 0.75
    gain: float = 0.1
    max_fall: float = 5.0  # log(density / scheduled) is clipped to [-max_fall, 1]
    reachable: Callable[[float], float] | None = None

    def penalised(self, step: int) -> bool:
        return step >= self.begin * self.total_steps

    def scheduled(self, step: int) -> float:
        cubic = cubic_schedule(step, self.total_steps, self.start, self.target, self.begin, self.reach)
        if self.reachable is None:
            return cubic
        return max(cubic, self.reachable(max(0.0, step - self.begin * self.total_steps)))

    def update(self, lam: float, density: float, step: int) -> float:
        goal = self.scheduled(step)
        # The log ratio weighs "twice too dense" and "half as dense as planned" alike.
        error = max(-self.max_fall, min(1.0, math.log(max(density, 1e-12) / goal)))
        return lam * math.exp(self.gain * error)


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
