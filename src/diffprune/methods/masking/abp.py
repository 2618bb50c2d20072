"""Adapting by pruning (Gao, Colombo, Wang 2021): learn which connections of the frozen
pretrained model to switch off for a task, and change no weight.

One real score per prunable weight; the paper initialises it at N(0.01, 0.001^2), every entry kept.
The forward pass masks with sigmoid(t_l * score), t_l = 1e5 (a step); the backward pass uses the
slope of sigmoid(t_s * score), t_s = 1 (straight-through). Scores are pushed toward pruning and a
pruned connection may come back. Training stops when the fraction of non-positive scores reaches
--sparsity; the mask is then made exact (the top 1 - s scores in --prune-scope) and a last phase
trains the head with it fixed.

The push. The paper adds gamma * sum(scores) to the loss (`--push loss`), a constant gamma set for
BERT-base at batch 8 (2e-7). Under Adam a constant in every score's gradient means nothing by
itself: how far it moves a score depends on that score's gradient noise, so whether a run reaches
its sparsity, and when, depends on the model, the batch size and the steps the run has. The
default (`--push shift`) takes the push out of the optimiser, as the paper's update rule writes it
(theta <- theta - lr * grad - gamma): after every step all scores move down by the one common
amount gamma_t that puts the sparsity on a cubic schedule (0 until --prune-begin, --sparsity at
--prune-reach). Whatever the model and the run's length, the target is reached at --prune-reach
and the stop rule fires there; which entries go is decided by the task gradient alone, since the
common shift keeps the scores' order.

The start. With the paper's start every score is alike, so the order the task gradient writes
is all the mask knows, and that order is a poor ranking of a weight's worth: on MiniLM at 50%
the learned mask does no better than a random one. The default (`--score-init magnitude`)
starts each score at 0.01 * |w| / mean |w| of its tensor: the mask starts as magnitude pruning
would have it, and the task gradient reorders it from there (benchmarks/README.md, "Where the
scores start", has both side by side).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffprune.base import BaseModel
from diffprune.heads import FROZEN_ENCODER_HEAD_LR
from diffprune.methods.masking.method import MaskMethod
from diffprune.methods.masking.options import AbpOptions
from diffprune.methods.registry import register
from diffprune.pruning.masked import MaskedModel
from diffprune.pruning.schedule import cubic_schedule
from diffprune.pruning.topk import kept_count
from diffprune.training.phases import LossInputs, ParamGroup, Phase
from diffprune.training.settings import TrainSettings


@register
class AdaptingByPruning(MaskMethod):
    name = "abp"
    summary = "adapting by pruning: learn which pretrained weights to switch off (a mask; no weight changes)"
    Config = AbpOptions
    learned = True
    # The scores' rate: small beside their start (mean 0.01) so that gradient noise alone takes
    # few below zero before the push does (over 345 steps a random walk of this rate moves
    # ~0.004); with the paper's start, large beside its spread (0.001) so that the task, not the
    # draw, orders them; with the magnitude start (spread ~0.01) the task reorders the weights
    # near each other in magnitude, and a consistent gradient can move any (2e-4 a step: 0.07
    # over 345 steps).
    default_lr = 2e-4

    def _mask_settings(self) -> dict[str, Any]:
        c = self.config
        return {"t_forward": c.t_forward, "t_backward": c.t_backward, "init_mean": c.score_init_mean,
                "init_std": c.score_init_std, "init_by_magnitude": c.score_init == "magnitude"}

    def head_lr(self, s: TrainSettings) -> float:
        """--head-lr, else the head rate every mask method uses (--lr is the scores')."""
        return s.head_lr if s.head_lr is not None else FROZEN_ENCODER_HEAD_LR

    def scores(self, model: MaskedModel) -> list[torch.Tensor]:
        return [s.detach() for s in model.scores]

    def prune_phase(self, model: MaskedModel, base: BaseModel, s: TrainSettings) -> Phase:
        c = self.config
        self.last_shift = 0.0

        def groups() -> list[ParamGroup]:
            # constant: a score's fall toward zero must not slow down as the phase goes on
            scores = ParamGroup("scores", list(model.scores), self.lr(s), 0.0, schedule="constant")
            return [scores] + self.head_groups(model, base, s)

        def push(_inputs: LossInputs) -> dict[str, torch.Tensor]:
            return {"push": c.gamma * sum(score.sum() for score in model.scores)}

        def shift(step: int, total: int) -> None:
            density = cubic_schedule(step, total, 1.0, 1 - c.sparsity, c.prune_begin, c.prune_reach)
            if density < 1.0:
                kept = kept_count(1 - density, model.total)
                self.last_shift = model.shift_scores_to(kept, per_tensor=c.prune_scope != "global")

        def reached() -> bool:
            done = model.kept_entries() <= self.kept_total
            if done and int(model.reached_at) < 0:
                model.reached_at.fill_(self.steps_done)
            return done

        def count(step: int, total: int) -> None:
            self.steps_done = step
            if c.push == "shift":
                shift(step, total)

        self.steps_done = 0
        return Phase(name="abp", param_groups=groups, epochs=s.epochs, max_steps=s.max_steps,
                     warmup_ratio=s.warmup_ratio, extra_losses=push if c.push == "loss" else None,
                     after_step=count, stop_when=reached, keep_best=False,
                     metrics=lambda: {"sparsity": model.sparsity(), "score_shift": self.last_shift})

    def record_extras(self, model: nn.Module, base: BaseModel) -> dict[str, Any]:
        reached = int(model.reached_at)
        return {**super().record_extras(model, base), "reached_at_step": reached if reached >= 0 else None}
