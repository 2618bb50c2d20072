"""How many entries a pattern keeps and which ones: the budget, the exact top-k, the scopes.

Every pruning method and diff pruning's projection choose entries here, so "k" has one source
of truth: `budget_count` turns a --budget into k, `sparsity_count` turns a --sparsity into the
entries kept, and `top_positions` picks exactly that many, ties broken toward the lowest index.
"""

from __future__ import annotations

import math

import torch

from diffprune.errors import DiffpruneError
from diffprune.training.settings import option

# "global": one threshold over every tensor (diff pruning's projection, the paper).
# "per-tensor": every tensor keeps the same fraction, the counts apportioned to sum to exactly k.
# "per-matrix": every tensor keeps round(fraction x its size) on its own (SparseBERT's rule:
#   the same sparsity in every matrix, whatever the others round to).
SCOPES = ("global", "per-tensor", "per-matrix")


def budget_option():
    return option(0.005, "Entries the patch keeps: a fraction of the base parameters, or a count if >= 1.")


def sparsity_option(default: float = 0.5):
    return option(default, "Fraction of the pruned tensors' entries switched off, in (0, 1).")


def scope_option(default: str = "global"):
    return option(default, "Where the top-k is taken: global (one threshold over all tensors), per-tensor "
                  "(each tensor the same fraction, summing to exactly k) or per-matrix (each tensor rounds alone).")


def check_budget(budget: float) -> None:
    if not budget > 0 or not math.isfinite(budget):
        raise DiffpruneError("--budget must be positive (a fraction like 0.005 or a count like 100000)")


def check_sparsity(sparsity: float) -> None:
    if not 0 < sparsity < 1:
        raise DiffpruneError(f"--sparsity must be in (0, 1), not {sparsity}")


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise DiffpruneError(f"unknown scope '{scope}'; choose one of {', '.join(SCOPES)}")


def budget_count(budget: float, base_params: int) -> int:
    """A fraction of the base parameters (budget < 1) or an absolute count (budget >= 1)."""
    check_budget(budget)
    k = round(budget * base_params) if budget < 1 else int(budget)
    return max(1, min(k, base_params))


def budget_fraction(budget: float, base_params: int) -> float:
    """The budget as a fraction of the base parameters, as given when it is one (not rounded to k)."""
    return budget if budget < 1 else budget / base_params


def kept_count(sparsity: float, numel: int) -> int:
    """Entries a tensor (or a set of tensors) of `numel` entries keeps at `sparsity` (in [0, 1])."""
    return round((1 - sparsity) * numel)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the k largest scores; ties at the threshold go to the lowest
    indices, so the choice is deterministic (torch.topk's tie order is not specified)."""
    flat = scores.reshape(-1)
    if k >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest
    above = (flat > threshold).nonzero().squeeze(1)
    ties = (flat == threshold).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def top_positions(scores: list[torch.Tensor], k: int, scope: str) -> torch.Tensor:
    """Global positions (into the concatenated tensors, in order) of the entries with the k
    largest scores, chosen in `scope` (see SCOPES; "per-matrix" keeps k / total of each tensor)."""
    check_scope(scope)
    sizes = [s.numel() for s in scores]
    if scope == "global":
        return top_k(torch.cat([s.detach().reshape(-1) for s in scores]), k)
    total = sum(sizes)
    quotas = apportion(sizes, k) if scope == "per-tensor" else [round(k * size / total) for size in sizes]
    chosen, start = [], 0
    for score, quota, size in zip(scores, quotas, sizes):
        chosen.append(top_k(score.detach(), quota) + start)
        start += size
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)


def keep_masks(scores: list[torch.Tensor], k: int, scope: str) -> list[torch.Tensor]:
    """Boolean masks shaped as `scores`: True for the entries `top_positions` keeps."""
    flat = torch.zeros(sum(s.numel() for s in scores), dtype=torch.bool, device=scores[0].device)
    flat[top_positions(scores, k, scope)] = True
    return [part.view_as(s) for part, s in zip(flat.split([s.numel() for s in scores]), scores)]


def apportion(sizes: list[int], k: int) -> list[int]:
    """Largest-remainder split of k in proportion to sizes (sums to exactly k)."""
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    quotas = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: k - sum(quotas)]:
        quotas[i] += 1
    return quotas


def keep_largest(tensors: list[torch.Tensor], count: int) -> None:
    """Zero, in place, every entry of `tensors` whose magnitude is below the `count`-th largest
    over all of them (ties at that magnitude stay: a later exact top-k settles the count)."""
    total = sum(t.numel() for t in tensors)
    if count >= total:
        return
    magnitudes = torch.cat([t.detach().abs().reshape(-1) for t in tensors])
    threshold = torch.kthvalue(magnitudes, total - count + 1).values
    for t, magnitude in zip(tensors, magnitudes.split([t.numel() for t in tensors])):
        t.detach().masked_fill_(magnitude.view_as(t) < threshold, 0.0)
