"""Stretched hard-concrete gates (Louizos, Welling, Kingma 2018), as used by diff pruning.

For a gate with parameter alpha: u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + alpha) / beta),
z = min(1, max(0, s * (r - l) + l)). The stretch (l < 0 < 1 < r) puts real probability mass on
exactly 0 and exactly 1, and the probability that z is nonzero has a closed form, so the L0 norm
has a differentiable expectation. Gradients reach alpha through the sample by autograd; nothing
is written into `.grad` by hand. Diff pruning's defaults: l = -1.5, r = 1.5, beta = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6  # keeps log(u) and log(1 - u) finite


@dataclass(frozen=True)
class GateShape:
    """The stretch interval (l, r) and the temperature beta of a hard-concrete distribution."""

    l: float = -1.5
    r: float = 1.5
    beta: float = 1.0

    def __post_init__(self) -> None:
        if not (self.l < 0 and self.r > 1 and self.beta > 0):
            raise ValueError(f"hard-concrete needs l < 0 < 1 < r and beta > 0, got {self}")

    @property
    def shift(self) -> float:
        """beta * log(-l / r): P(z != 0) = sigmoid(alpha - shift). Zero for a symmetric stretch."""
        return self.beta * math.log(-self.l / self.r)


def sample(alpha: torch.Tensor, shape: GateShape = GateShape()) -> torch.Tensor:
    """One reparameterised sample z in [0, 1] per entry of alpha."""
    # Few, fused passes: this runs over every gated entry at every training step.
    noise = torch.rand_like(alpha).clamp_(_EPS, 1 - _EPS).logit_()  # log u - log(1 - u)
    logits = noise.add_(alpha) if shape.beta == 1 else (noise + alpha) / shape.beta
    return F.hardtanh((torch.sigmoid(logits) * (shape.r - shape.l)).add_(shape.l), 0.0, 1.0)


def deterministic(alpha: torch.Tensor, shape: GateShape = GateShape()) -> torch.Tensor:
    """The test-time gate: the stretched sigmoid of alpha, clipped to [0, 1]."""
    return (torch.sigmoid(alpha) * (shape.r - shape.l) + shape.l).clamp(0.0, 1.0)


def gate(alpha: torch.Tensor, shape: GateShape, training: bool) -> torch.Tensor:
    """A sample in training, the deterministic gate in eval."""
    return sample(alpha, shape) if training else deterministic(alpha, shape)


def prob_nonzero(alpha: torch.Tensor, shape: GateShape = GateShape()) -> torch.Tensor:
    """P(z != 0) per entry, in closed form; its sum is the expected L0 norm."""
    return torch.sigmoid(alpha - shape.shift)


class HardConcrete(nn.Module):
    """A tensor of gates with no input: `forward()` samples in training, is deterministic in eval.
    (DiffModel keeps its gate logits per diffed tensor and calls the functions above directly.)"""

    def __init__(self, size: int | Sequence[int], init: float = 5.0, shape: GateShape = GateShape()) -> None:
        super().__init__()
        self.shape = shape
        self.log_alpha = nn.Parameter(torch.full((size,) if isinstance(size, int) else tuple(size), float(init)))

    def forward(self) -> torch.Tensor:
        return gate(self.log_alpha, self.shape, self.training)

    def expected_l0(self) -> torch.Tensor:
        return prob_nonzero(self.log_alpha, self.shape).sum()

    def extra_repr(self) -> str:
        return f"size={tuple(self.log_alpha.shape)}, l={self.shape.l}, r={self.shape.r}, beta={self.shape.beta}"
