"""How the L0 phase's density falls: the paper's fixed lambda, lambda steered by the density
controller, or the gate logits shifted onto the density schedule."""

from __future__ import annotations

import torch

from diffprune.gates import prob_nonzero
from diffprune.methods.diff.trend import LogitTrend
from diffprune.pruning.schedule import DensityController
from diffprune.methods.diff.model import DiffModel
from diffprune.methods.diff.options import DiffOptions

PAPER_LAMBDA = 1.25e-7  # BERT-large; also the controller's starting point


class DensitySteering:
    """Owns the density's fall in one L0 phase: the penalty term the loop adds to the loss, and
    what moves after every step (lambda, or the gate logits themselves).

    With `--l0-lambda` set, lambda stays at that value. Otherwise the phase starts with no
    penalty and a `DensityController` moves lambda after each step, by the expected density
    now or, with `--controller-lookahead`, by the density the gate logits are heading for
    (`LogitTrend`). Lambda, the logits' moving average and the controller's other state live in
    the model's buffers or are rebuilt from the logits, so a resumed run steers exactly as the
    uninterrupted one.

    With `--steer shift` there is no penalty at all: after each step the entry gate logits all
    move down by the one amount that puts the expected density on the controller's schedule
    (`DiffModel.lower_gates_to`). Under Adam, a lambda large enough to move the density closes
    every gate the task does not defend at the full gate learning rate, within a few tens of
    steps (the collapses in benchmarks/README.md), so the gates choose before w has learned the
    task; the shift cannot outrun the schedule, and the task alone decides which gates stay
    above the common level. It is stateless: the logits carry it through a resume.
    """

    def __init__(self, model: DiffModel, options: DiffOptions, target: float) -> None:
        self.model, self.options, self.target = model, options, target
        self.controller: DensityController | None = None  # made at the first step, which knows the phase's length
        self.trend: LogitTrend | None = None
        self.heading_density: float | None = None  # the lookahead's last prediction, for the log
        self.last_l0: float | None = None  # the product-form expected L0 of the last step
        self.last_shift: float | None = None  # how far the last step lowered the gate logits (--steer shift)

    @property
    def steered(self) -> bool:
        return self.options.l0_lambda is None

    @property
    def shifted(self) -> bool:
        return self.options.steer == "shift"

    def start(self) -> None:
        self.model.l0_lambda.fill_(0.0 if self.steered else self.options.l0_lambda)
        self.trend = self._follow_the_gates() if self.options.controller_lookahead else None
        if self.trend is not None:
            self.trend.restart()

    def penalty(self) -> dict[str, torch.Tensor]:
        """The loss term lambda * E[L0]; remembers E[L0] when it is the density the controller reads."""
        o, model = self.options, self.model
        if self.shifted:
            return {}
        l0 = model.expected_l0(o.group_penalty)
        self.last_l0 = l0.item() if o.group_penalty == "product" or not model.structured else None
        return {"l0_penalty": float(model.l0_lambda) * l0}

    def after_step(self, step: int, total: int) -> None:
        o = self.options
        if o.alpha_max is not None:
            with torch.no_grad():
                for alpha in self.model.gate_logits():
                    alpha.clamp_(max=o.alpha_max)
        if not self.steered:
            return
        if o.controller_lookahead:
            self.trend = self.trend or self._follow_the_gates()  # after a resume: the checkpoint's average
            self.trend.update()
        if self.controller is None:
            self.controller = DensityController(target=self.target, start=1.0, total_steps=total, begin=o.l0_warmup,
                                                reach=o.l0_reach, gain=o.controller_gain,
                                                reachable=self._reachable if o.schedule == "reachable" else None)
        if not self.controller.penalised(step):
            return
        if self.shifted:
            self.last_shift = self.model.lower_gates_to(self.controller.scheduled(step))
            return
        lam = float(self.model.l0_lambda) or PAPER_LAMBDA  # the paper's value is the first one used
        self.model.l0_lambda.fill_(self.controller.update(lam, self._density(), step + o.controller_lookahead))

    def metrics(self) -> dict[str, float]:
        model = self.model
        logged = {"expected_density": model.expected_density(), "l0_lambda": float(model.l0_lambda),
                  "gates_above_init": model.fraction_of_gates_above(self.options.alpha_init)}
        if self.heading_density is not None:
            logged["heading_density"] = self.heading_density
        if self.last_shift is not None:
            logged["logit_shift"] = self.last_shift
        return logged

    def _density(self) -> float:
        """The density the controller steers on: where the gates are heading, or where they are."""
        model = self.model
        if self.trend is not None:
            heading = self.trend.ahead(self.options.controller_lookahead)
            group = next(heading) if model.structured else None
            self.heading_density = model.expected_density(heading, group)
            return self.heading_density
        return self.last_l0 / model.total if self.last_l0 is not None else model.expected_density()

    def _follow_the_gates(self) -> LogitTrend:
        logits, averages = self.model.gate_logits(), self.model.logit_averages()
        if self.model.structured:  # group logits first: the entries' expected density needs them
            logits, averages = logits[-1:] + logits[:-1], averages[-1:] + averages[:-1]
        return LogitTrend(logits, averages)

    def _reachable(self, steps: float) -> float:
        """The density if every gate fell one gate learning rate per step since the penalty began."""
        o = self.options
        return float(prob_nonzero(torch.tensor(o.alpha_init - o.alpha_lr * steps), self.model.gate_shape))
