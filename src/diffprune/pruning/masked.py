"""The frozen base with some of its entries switched off: theta = theta0 * mask.

The mask comes from one of two sources:

* learned scores (adapting by pruning): one real score per entry, the forward pass uses
  sigmoid(t_l * score) (a step for t_l = 1e5) and the backward pass the slope of
  sigmoid(t_s * score) (straight-through; autograd, through the usual detach identity);
* a fixed boolean mask (magnitude or random pruning, and every method once its mask is exact).

Like diff pruning's DiffModel, the wrapped HF model is called through
`torch.func.functional_call` with the masked tensors, so any architecture works, nothing is
forked or monkeypatched, and the base itself is never written to.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from diffprune.pruning.topk import apportion


def straight_through_mask(scores: torch.Tensor, t_forward: float, t_backward: float) -> torch.Tensor:
    """sigmoid(t_forward * s) in the forward pass, the gradient of sigmoid(t_backward * s) in the backward."""
    soft = torch.sigmoid(t_backward * scores)
    hard = torch.sigmoid(t_forward * scores)
    return soft + (hard - soft).detach()


def initial_scores(theta0: torch.Tensor, mean: float, std: float, by_magnitude: bool,
                   generator: torch.Generator | None) -> torch.Tensor:
    """N(mean, std^2) per entry (the paper: the mask starts blind to the weights), or, `by_magnitude`,
    mean * |w| / mean(|w|) of the tensor: the scores start in the weights' magnitude order with the
    same mean, every nonzero weight kept, and training reorders them from there."""
    if not by_magnitude:
        return torch.empty_like(theta0).normal_(mean, std, generator=generator)
    magnitude = theta0.detach().abs()
    return magnitude * (mean / magnitude.mean().clamp_min(torch.finfo(magnitude.dtype).tiny))


class MaskedModel(nn.Module):
    """`names`: the pruned base tensors. `learned`: whether scores train the mask (else fixed)."""

    def __init__(self, model: nn.Module, names: list[str], *, learned: bool, t_forward: float = 1e5,
                 t_backward: float = 1.0, init_mean: float = 0.01, init_std: float = 0.001,
                 init_by_magnitude: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        self.t_forward, self.t_backward = t_forward, t_backward
        params = dict(model.named_parameters())
        self._theta0 = [params[n] for n in self.names]  # the base itself, not a copy
        for p in self._theta0:
            p.requires_grad_(False)
        # Scores exist only for a learned mask; a fixed-mask method keeps a boolean buffer alone.
        self.scores = nn.ParameterList(
            [nn.Parameter(initial_scores(p, init_mean, init_std, init_by_magnitude, generator))
             for p in self._theta0] if learned else [])
        for i, p in enumerate(self._theta0):
            self.register_buffer(f"keep_{i}", torch.ones_like(p, dtype=torch.bool))
        self.register_buffer("fixed", torch.tensor(not learned))
        # The step at which a learned mask reached its target sparsity (-1: not yet), for the record.
        self.register_buffer("reached_at", torch.tensor(-1))
        self.numels = [p.numel() for p in self._theta0]
        self.total = sum(self.numels)

    @property
    def keep(self) -> list[torch.Tensor]:
        return [getattr(self, f"keep_{i}") for i in range(len(self.names))]

    @property
    def learning(self) -> bool:
        return not bool(self.fixed)

    def masks(self) -> list[torch.Tensor]:
        if self.learning:
            return [straight_through_mask(s, self.t_forward, self.t_backward) for s in self.scores]
        return self.keep

    def forward(self, **batch):
        params = {n: theta0 * mask for n, theta0, mask in zip(self.names, self._theta0, self.masks())}
        return functional_call(self.model, params, args=(), kwargs=batch, strict=False)

    @torch.no_grad()
    def kept(self) -> list[torch.Tensor]:
        """Boolean masks of the entries kept now: score > 0 while learning, the fixed mask after."""
        return [s > 0 for s in self.scores] if self.learning else self.keep

    @torch.no_grad()
    def kept_entries(self) -> int:
        return sum(int(k.sum()) for k in self.kept())

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of the pruned tensors' entries switched off now."""
        return 1 - self.kept_entries() / self.total

    @torch.no_grad()
    def fix(self, masks: list[torch.Tensor]) -> None:
        """Enter the fixed mode with these boolean masks (True: kept); the scores stop training."""
        for keep, mask in zip(self.keep, masks):
            keep.copy_(mask)
        self.fixed.fill_(True)
        for s in self.scores:
            s.requires_grad_(False)

    @torch.no_grad()
    def shift_scores_to(self, kept: int, per_tensor: bool) -> float:
        """Lower every score by the one amount c >= 0 (one per tensor if `per_tensor`, the count
        apportioned by size) that leaves `kept` of them positive; never raise them. Returns the
        largest c used."""
        groups = [[s] for s in self.scores] if per_tensor else [list(self.scores)]
        counts = apportion(self.numels, kept) if per_tensor else [kept]
        largest = 0.0
        for group, keep in zip(groups, counts):
            flat = torch.cat([s.reshape(-1) for s in group])
            if keep >= flat.numel():
                continue
            # the (keep + 1)-th largest score lands on 0: exactly `keep` stay above it (ties aside)
            c = float(torch.kthvalue(flat, flat.numel() - keep).values)
            if c > 0:
                for s in group:
                    s.sub_(c)
                largest = max(largest, c)
        return largest
