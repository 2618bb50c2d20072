"""A phase: one stretch of training with its own parameters, optimiser, schedule and extra losses.

Single-stage methods have one phase; diff pruning has an L0 phase and a fixed-mask phase, with
the projection to the budget at the start of the second. The loop runs any list of phases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn


@dataclass
class ParamGroup:
    """Named optimiser group; `max_grad_norm` clips this group on its own when set."""

    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float = 0.0
    schedule: str = "linear"  # "linear": warmup then linear decay; "constant": fixed lr
    max_grad_norm: float | None = None


@dataclass
class LossInputs:
    """What an extra loss term reads: this process's batch, the model's outputs on it, and the
    teacher's outputs on it (None when the phase has no teacher)."""

    batch: dict[str, torch.Tensor]
    outputs: Any
    teacher: Any = None


@dataclass
class Phase:
    name: str
    param_groups: Callable[[], list[ParamGroup]]
    epochs: float
    max_steps: int | None = None
    warmup_ratio: float = 0.1
    # Extra named loss terms (the L0 penalty, distillation's terms), added to the task loss and
    # logged one by one. Each is weighted by this process's share of the global batch, as the
    # task loss is, so a term that is the same on every process keeps its value on average.
    extra_losses: Callable[[LossInputs], dict[str, torch.Tensor]] | None = None
    # A frozen model called on the same batch without gradients (knowledge distillation); its
    # outputs reach `extra_losses` as `LossInputs.teacher`.
    teacher: Callable[[dict[str, torch.Tensor]], Any] | None = None
    # Whether the model's own task loss is trained on; it is logged either way (distillation
    # may train on the teacher's terms alone).
    train_task_loss: bool = True
    # Runs once when the phase begins fresh (not on resume: its effect lives in the checkpoint).
    on_start: Callable[[], None] | None = None
    # Runs after every optimiser step with (steps done in this phase, the phase's total steps).
    after_step: Callable[[int, int], None] | None = None
    # Named values that are not losses (e.g. the expected density), logged with the loss terms.
    metrics: Callable[[], dict[str, float]] | None = None
    keep_best: bool = True
    # Ends the phase before its last step once true (checked after every step, and before the
    # first one of a resumed phase): a function of the trained state, so a resume agrees.
    stop_when: Callable[[], bool] | None = None

    def stopped(self) -> bool:
        return self.stop_when is not None and self.stop_when()

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * steps_per_epoch)) if self.epochs > 0 else 0


def decay_split(named: Iterable[tuple[str, nn.Parameter]]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Matrices get weight decay; vectors (biases, norms) do not. Decided by shape, not by name."""
    decay, no_decay = [], []
    for _, p in named:
        (decay if p.ndim >= 2 else no_decay).append(p)
    return decay, no_decay


def head_groups(model: nn.Module, head_names: frozenset[str], lr: float, wd: float) -> list[ParamGroup]:
    """The task head's groups, for a method that wraps the HF `model` and trains other tensors
    beside it (diff values, mask scores)."""
    decay, no_decay = decay_split((n, p) for n, p in model.named_parameters() if n in head_names)
    return [ParamGroup("head", decay, lr, wd), ParamGroup("head_no_decay", no_decay, lr, 0.0)]


def standard_groups(
    named: Iterable[tuple[str, nn.Parameter]], head_names: frozenset[str], lr: float, head_lr: float, wd: float
) -> list[ParamGroup]:
    """Body and head groups, each split into decayed and non-decayed parameters."""
    named = [(n, p) for n, p in named if p.requires_grad]
    body = [(n, p) for n, p in named if n not in head_names]
    head = [(n, p) for n, p in named if n in head_names]
    groups = []
    for label, items, group_lr in (("body", body, lr), ("head", head, head_lr)):
        decay, no_decay = decay_split(items)
        groups.append(ParamGroup(f"{label}", decay, group_lr, wd))
        groups.append(ParamGroup(f"{label}_no_decay", no_decay, group_lr, 0.0))
    return [g for g in groups if g.params]


def build_optimizer(groups: list[ParamGroup]) -> torch.optim.Optimizer:
    params = [p for g in groups for p in g.params]
    # The fused kernel is the fastest AdamW where torch has one for these tensors' device.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params) or None
    return torch.optim.AdamW(
        [{"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name} for g in groups],
        fused=fused,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, groups: list[ParamGroup], total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(warmup_ratio * total_steps)

    def linear(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    def constant(step: int) -> float:
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [linear if g.schedule == "linear" else constant for g in groups]
    )
