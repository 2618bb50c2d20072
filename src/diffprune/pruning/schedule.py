"""When entries are pruned: one-shot, or a cubic fall (Zhu and Gupta 2017) in N pruning events."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from diffprune.errors import DiffpruneError
from diffprune.training.settings import option

SCHEDULES = ("one-shot", "cubic")


def begin_option():
    return option(0.25, "Gradual pruning: fraction of the pruning phase before the first entry is removed.")


def reach_option():
    return option(0.75, "Gradual pruning: fraction of the pruning phase by which the final sparsity (or budget) is reached.")


def check_span(begin: float, reach: float) -> None:
    if not 0 <= begin < reach <= 1:
        raise DiffpruneError("need 0 <= --prune-begin < --prune-reach <= 1")


def cubic_schedule(step: int, total_steps: int, start: float, target: float, begin: float, reach: float) -> float:
    """`start` until `begin` (a fraction of the steps), then a cubic fall (Zhu and Gupta 2017),
    fast first and slow near the end, to `target` at `reach`, held from there."""
    span = max(1.0, (reach - begin) * total_steps)
    t = min(1.0, max(0.0, step - begin * total_steps) / span)
    return target + (start - target) * (1 - t) ** 3


@dataclass(frozen=True)
class PruningSchedule:
    """The sparsity in force after `step` of `total` steps.

    "one-shot": the final sparsity from the first step. "cubic": s_t = s_f + (s_i - s_f) (1 - t)^3
    with t the fraction of the span [begin, reach] of the steps that has passed, evaluated only at
    `events` evenly spaced pruning events (the sparsity holds between them), so the mask changes
    `events` times, as in SparseBERT (100 events over all steps)."""

    kind: str = "cubic"
    final: float = 0.5
    initial: float = 0.0
    events: int = 100
    begin: float = 0.0
    reach: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise DiffpruneError(f"unknown pruning schedule '{self.kind}'; choose one of {', '.join(SCHEDULES)}")
        if self.events < 1:
            raise DiffpruneError("the number of pruning events must be at least 1")
        check_span(self.begin, self.reach)

    def event(self, step: int, total: int) -> int:
        """How many pruning events have happened after `step` (0 before the first)."""
        if self.kind == "one-shot":
            return 1
        span = (self.reach - self.begin) * total
        passed = (step - self.begin * total) / max(span, 1e-9)
        return min(self.events, max(0, math.floor(passed * self.events + 1e-9)))

    def sparsity(self, step: int, total: int) -> float:
        if self.kind == "one-shot":
            return self.final
        t = self.event(step, total) / self.events
        return self.final + (self.initial - self.final) * (1 - t) ** 3


@dataclass
class DensityController:
    """Steers a penalty weight so that a density follows a cubic schedule to `target`.

    A penalty's useful size depends on the model, the task and the optimiser (Adam rescales
    each coordinate), so no fixed weight fits every model: diff pruning's BERT-large value
    closes every gate of a small model on RTE. Instead the weight moves multiplicatively, up
    while the density is above its scheduled value and down while below, so the phase ends
    near the target density on any model and task.

    The schedule holds the density at `start` for the first `begin` fraction of the phase (no
    penalty): until the task has taught the parameters something, a penalty acting from the
    first step removes entries nearly at random. It then falls cubically (Zhu and Gupta 2017)
    to the target at `reach`, and holds. The weight falls faster than it rises: with Adam,
    every entry the task does not defend goes at the full learning rate once the penalty
    outweighs Adam's epsilon, so overshoot must be stopped fast.

    `reachable` (a function of the penalised steps so far) floors the schedule at the lowest
    density the parameters can reach, so that the error does not stay positive whatever they
    do while the weight winds up by orders of magnitude.
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

    def update(self, weight: float, density: float, step: int) -> float:
        goal = self.scheduled(step)
        # The log ratio weighs "twice too dense" and "half as dense as planned" alike.
        error = max(-self.max_fall, min(1.0, math.log(max(density, 1e-12) / goal)))
        return weight * math.exp(self.gain * error)
