"""The budget: counts, exact top-k with deterministic ties, projection scopes, the density controller."""

from __future__ import annotations

import math

import pytest
import torch

from diffprune.errors import DiffpruneError
from diffprune.methods.diff.trend import LogitTrend
from diffprune.pruning.schedule import DensityController
from diffprune.pruning.topk import apportion as _apportion
from diffprune.pruning.topk import budget_count, keep_largest, top_k, top_positions


def project(deltas, k, scope):
    """Diff pruning's projection with plain |delta| as the score."""
    return top_positions([d.abs() for d in deltas], k, scope)


def _reference_top_k(values: list[float], k: int) -> list[int]:
    """Largest first, ties by lowest index; returned in index order."""
    return sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])


# -- budget_count -----------------------------------------------------------------------------
def test_budget_count_fraction_and_count():
    assert budget_count(0.01, 1000) == 10
    assert budget_count(0.005, 22_713_216) == round(0.005 * 22_713_216)
    assert budget_count(500, 1000) == 500  # >= 1: a count
    assert budget_count(500.0, 1000) == 500
    assert budget_count(1, 1000) == 1  # 1 is a count of one entry, not 100%
    assert budget_count(0.999, 1000) == 999


def test_budget_count_is_clamped():
    assert budget_count(1e-9, 1000) == 1  # rounds to 0, kept at least 1
    assert budget_count(5000, 1000) == 1000  # never more than the base has


@pytest.mark.parametrize("bad", [0, 0.0, -0.01, -5])
def test_budget_count_rejects_non_positive(bad):
    with pytest.raises(DiffpruneError, match="--budget must be positive"):
        budget_count(bad, 1000)


# -- top_k ------------------------------------------------------------------------------------
def test_top_k_distinct_values():
    scores = torch.tensor([0.3, -1.0, 5.0, 2.0, 0.0, 4.0])
    assert top_k(scores, 3).tolist() == [2, 3, 5]
    assert top_k(scores, 1).tolist() == [2]
    assert top_k(scores.reshape(2, 3), 2).tolist() == [2, 5]  # flat indices of any shape


def test_top_k_ties_go_to_lowest_indices():
    scores = torch.tensor([1.0, 3.0, 1.0, 3.0, 1.0, 2.0, 1.0, 3.0])
    assert top_k(scores, 2).tolist() == [1, 3]  # three 3s tie for two places: the first two
    assert top_k(scores, 4).tolist() == [1, 3, 5, 7]
    assert top_k(scores, 5).tolist() == [0, 1, 3, 5, 7]  # one of four 1s: index 0
    assert top_k(scores, 6).tolist() == [0, 1, 2, 3, 5, 7]
    assert top_k(torch.zeros(10), 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_top_k_many_ties_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (300,), generator=g).float()  # ~50 copies of every value
    for k in (1, 7, 49, 50, 51, 150, 299):
        chosen = top_k(scores, k)
        assert chosen.numel() == k and chosen.dtype == torch.int64
        assert torch.equal(chosen, chosen.sort().values) and chosen.unique().numel() == k
        assert chosen.tolist() == _reference_top_k(scores.tolist(), k)
        rest = torch.ones(300, dtype=torch.bool)
        rest[chosen] = False
        assert scores[chosen].min() >= scores[rest].max()
        assert torch.equal(top_k(scores, k), chosen)  # deterministic


def test_top_k_k_at_least_n_returns_all():
    scores = torch.tensor([3.0, 1.0, 2.0])
    assert top_k(scores, 3).tolist() == [0, 1, 2]
    assert top_k(scores, 10).tolist() == [0, 1, 2]


# -- project ----------------------------------------------------------------------------------
def _deltas(seed=0, sizes=((4, 5), (30,), (6, 10))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in sizes]


def test_project_global_picks_largest_magnitudes():
    deltas = _deltas()
    flat = torch.cat([d.reshape(-1) for d in deltas])
    for k in (1, 5, 17, 40, 110):
        positions = project(deltas, k, "global")
        assert positions.numel() == k and torch.equal(positions, positions.sort().values)
        assert positions.tolist() == _reference_top_k(flat.abs().tolist(), k)
    # A large negative delta counts by its magnitude.
    deltas[1][3] = -100.0
    assert project(deltas, 1, "global").tolist() == [20 + 3]


def test_project_global_ties_across_tensors():
    deltas = [torch.tensor([1.0, -2.0, 2.0]), torch.tensor([2.0, -2.0, 0.5])]
    assert project(deltas, 3, "global").tolist() == [1, 2, 3]  # four |2|s tie: the first three


def test_project_per_tensor_proportional_shares():
    deltas = _deltas(sizes=((10,), (30,), (60,)))
    positions = project(deltas, 10, "per-tensor")
    assert positions.numel() == 10 and torch.equal(positions, positions.sort().values)
    counts = [int(((positions >= a) & (positions < b)).sum()) for a, b in ((0, 10), (10, 40), (40, 100))]
    assert counts == [1, 3, 6]
    # Each tensor keeps its own largest entries.
    start = 0
    for delta, count in zip(deltas, counts):
        local = positions[(positions >= start) & (positions < start + delta.numel())] - start
        assert local.tolist() == _reference_top_k(delta.abs().tolist(), count)
        start += delta.numel()
    # k = 7: exact shares 0.7, 2.1, 4.2 -> floors 0, 2, 4 and the one left over goes to the largest remainder.
    positions = project(deltas, 7, "per-tensor")
    assert [int(((positions >= a) & (positions < b)).sum()) for a, b in ((0, 10), (10, 40), (40, 100))] == [1, 2, 4]


def test_project_unknown_scope():
    with pytest.raises(DiffpruneError, match="unknown scope"):
        project(_deltas(), 3, "per-layer")


def test_apportion_sums_to_k_within_one_of_exact():
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        sizes = torch.randint(1, 500, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        k = int(torch.randint(1, sum(sizes) + 1, (1,), generator=g))
        quotas = _apportion(sizes, k)
        assert sum(quotas) == k
        for size, quota in zip(sizes, quotas):
            exact = k * size / sum(sizes)
            assert math.floor(exact) <= quota <= math.ceil(exact) and 0 <= quota <= size
    assert _apportion([10, 30, 60], 7) == [1, 2, 4]
    assert _apportion([1, 1, 1], 3) == [1, 1, 1]
    assert _apportion([1, 1, 1], 2) == [1, 1, 0]  # equal remainders: lowest index first


def test_project_per_tensor_exactly_k_for_many_sizes():
    deltas = _deltas(seed=1, sizes=((7,), (13,), (1,), (50,), (3, 3)))
    total = sum(d.numel() for d in deltas)
    for k in range(1, total + 1):
        positions = project(deltas, k, "per-tensor")
        assert positions.numel() == k and positions.unique().numel() == k
        assert positions.min() >= 0 and positions.max() < total


# -- keep_largest (non-adaptive's gradual pruning) -----------------------------------------------
def test_keep_largest_zeroes_all_but_the_largest_magnitudes_over_all_tensors():
    a, b = torch.tensor([0.5, -3.0, 0.1]), torch.tensor([[2.0, -0.2], [0.0, 1.0]])
    keep_largest([a, b], 3)
    assert a.tolist() == [0.0, -3.0, 0.0] and b.tolist() == [[2.0, 0.0], [0.0, 1.0]]
    keep_largest([a, b], 10)  # more than there are: nothing changes
    assert a.tolist() == [0.0, -3.0, 0.0]


def test_keep_largest_keeps_ties_at_the_threshold():
    t = torch.tensor([1.0, -1.0, 1.0, 0.5])
    keep_largest([t], 2)  # the projection, not this cut, settles ties to an exact count
    assert t.tolist() == [1.0, -1.0, 1.0, 0.0]


# -- DensityController ------------------------------------------------------------------------
def test_density_schedule():
    c = DensityController(target=0.01, start=1.0, total_steps=100, begin=0.25, reach=0.75, gain=0.1)
    for step in (0, 10, 24):  # the warm stretch: gates held open, no penalty yet
        assert c.scheduled(step) == 1.0 and not c.penalised(step)
    assert c.penalised(25) and c.scheduled(25) == 1.0
    assert c.scheduled(50) == pytest.approx(0.01 + 0.99 * 0.5**3)  # cubic: (1 - 25/50)^3
    for step in (75, 76, 100, 10_000):
        assert c.scheduled(step) == pytest.approx(0.01, abs=1e-15)
    values = [c.scheduled(s) for s in range(0, 90)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never goes back up


def test_density_controller_steers_lambda_with_bounded_steps():
    c = DensityController(target=0.01, start=1.0, total_steps=100, begin=0.25, reach=0.75, gain=0.1)
    lam, goal = 1e-7, c.scheduled(40)
    up = c.update(lam, goal * 1.5, 40)  # density above schedule: more penalty
    assert up > lam and up == pytest.approx(lam * 1.5**0.1)  # exp(gain * log(1.5))
    down = c.update(lam, goal * 0.5, 40)  # below: less penalty
    assert down < lam and down == pytest.approx(lam * 0.5**0.1)
    assert c.update(lam, goal, 40) == pytest.approx(lam)
    # Up by at most exp(gain) a step; down by at most exp(gain * max_fall), to stop a collapse fast.
    assert c.update(lam, 1000.0, 40) == pytest.approx(lam * math.exp(0.1))
    assert c.update(1e-7, 1e-9, 80) == pytest.approx(1e-7 * math.exp(-0.1 * 5.0))
    for density in torch.linspace(0, 5, 101).tolist():
        factor = c.update(1.0, density, 60) / 1.0
        assert math.exp(-0.5) - 1e-12 <= factor <= math.exp(0.1) + 1e-12


def test_reachable_schedule_never_asks_for_less_than_the_gates_can_reach():
    fall = lambda steps: 1 / (1 + math.exp(-(5.0 - 0.1 * steps)))  # noqa: E731 - logit 5, 0.1 a step
    cubic = DensityController(target=0.01, start=1.0, total_steps=234)
    floored = DensityController(target=0.01, start=1.0, total_steps=234, reachable=fall)
    begin = 0.25 * 234
    for step in range(0, 235):
        assert floored.scheduled(step) == pytest.approx(max(cubic.scheduled(step), fall(max(0.0, step - begin))))
    assert floored.scheduled(80) > 0.9 > cubic.scheduled(80)  # early on the gates cannot keep up
    assert floored.scheduled(234) == pytest.approx(0.01, rel=1e-3)  # the target is still reached


def test_logit_trend_extrapolates_each_gates_velocity():
    logits = [torch.full((3,), 5.0), torch.tensor([0.0, 1.0])]
    velocity = [torch.tensor([-0.1, 0.0, 0.2]), torch.tensor([0.05, -0.3])]
    averages = [torch.empty_like(a) for a in logits]
    trend = LogitTrend(logits, averages, beta=0.9)
    trend.restart()
    assert all(torch.equal(a, b) for a, b in zip(trend.ahead(50), logits))  # no motion seen yet
    for _ in range(200):  # long enough for the average's lag to settle at beta / (1 - beta) steps
        for logit, v in zip(logits, velocity):
            logit.add_(v)
        trend.update()
    for predicted, logit, v in zip(trend.ahead(30), logits, velocity):
        torch.testing.assert_close(predicted, logit + 30 * v)
    assert all(torch.equal(a, b) for a, b in zip(trend.ahead(0), logits))
    assert trend.average is averages  # kept in the caller's tensors, which a checkpoint can carry
