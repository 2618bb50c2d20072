"""Hard-concrete gates: closed forms pinned by hand, Monte Carlo against them, gradients, the module."""

from __future__ import annotations

import math

import pytest
import torch

from diffprune import gates
from diffprune.gates import GateShape, HardConcrete, deterministic, prob_nonzero, sample

SYMMETRIC = GateShape()  # diff pruning's default: l = -1.5, r = 1.5, beta = 1
ASYMMETRIC = GateShape(l=-0.1, r=1.1, beta=2 / 3)  # Louizos et al.'s stretch and temperature


def _mc(alpha: float, shape: GateShape, n: int = 200_000, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return sample(torch.full((n,), alpha, dtype=torch.float64), shape)


def _expected_z(alpha: float, shape: GateShape, points: int = 2_000_000) -> float:
    """E[z] = integral over u in (0, 1) of z(u): midpoint rule on a fine grid, in float64."""
    u = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + alpha) / shape.beta)
    return float((s * (shape.r - shape.l) + shape.l).clamp(0, 1).mean())


def test_prob_nonzero_symmetric_stretch_is_the_sigmoid():
    assert SYMMETRIC.shift == 0.0
    alpha = torch.linspace(-8, 8, 33, dtype=torch.float64)
    assert torch.equal(prob_nonzero(alpha, SYMMETRIC), torch.sigmoid(alpha))
    assert prob_nonzero(torch.tensor(0.0)).item() == 0.5


def test_prob_nonzero_asymmetric_stretch_pinned():
    # shift = beta * log(-l / r) = (2/3) * ln(0.1 / 1.1) = (2/3) * (-2.3978953) = -1.5985968
    assert ASYMMETRIC.shift == pytest.approx(-1.5985968485, abs=1e-9)
    alpha = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    # sigmoid(0 + 1.5985968) = 1 / (1 + e^-1.5985968) = 1 / 1.2021800 = 0.8318222
    pinned = torch.tensor([0.8318221840, 0.9307712206, 0.4009752644], dtype=torch.float64)
    torch.testing.assert_close(prob_nonzero(alpha, ASYMMETRIC), pinned, atol=1e-9, rtol=0)
    closed_form = torch.sigmoid(alpha - ASYMMETRIC.beta * math.log(0.1 / 1.1))
    torch.testing.assert_close(prob_nonzero(alpha, ASYMMETRIC), closed_form)


@pytest.mark.parametrize("shape", [SYMMETRIC, ASYMMETRIC], ids=["symmetric", "asymmetric"])
def test_samples_in_unit_interval_with_mass_at_both_ends(shape):
    z = _mc(0.0, shape, n=50_000)
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).float().mean() > 0.05  # an atom at exactly 0 ...
    assert (z == 1).float().mean() > 0.05  # ... and at exactly 1
    assert ((z > 0) & (z < 1)).any()


@pytest.mark.parametrize("shape", [SYMMETRIC, ASYMMETRIC], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("alpha", [-2.0, 0.0, 1.5])
def test_monte_carlo_matches_closed_form_and_integral(alpha, shape):
    z = _mc(alpha, shape)
    nonzero = (z != 0).double().mean().item()
    assert nonzero == pytest.approx(prob_nonzero(torch.tensor(alpha, dtype=torch.float64), shape).item(), abs=0.005)
    assert z.mean().item() == pytest.approx(_expected_z(alpha, shape), abs=0.005)


def test_expected_z_integral_is_sane():
    # alpha = 0, l = -1.5, r = 1.5: s = u, z = clamp(3u - 1.5, 0, 1), so by hand
    # E[z] = int_{1/2}^{5/6} (3u - 3/2) du + (1 - 5/6) = 1/6 + 1/6 = 1/3.
    assert _expected_z(0.0, SYMMETRIC) == pytest.approx(1 / 3, abs=1e-9)
    assert _expected_z(-20.0, SYMMETRIC) < 1e-6 and _expected_z(20.0, SYMMETRIC) > 1 - 1e-6


def test_deterministic_gate_pinned():
    assert deterministic(torch.tensor(5.0)).item() == 1.0  # sigmoid(5) * 3 - 1.5 = 1.48 -> 1
    assert deterministic(torch.tensor(0.0)).item() == 0.0  # 0.5 * 3 - 1.5 = 0
    assert deterministic(torch.tensor(-3.0)).item() == 0.0
    # sigmoid(log 2) = 2/3: 2/3 * 3 - 1.5 = 0.5
    assert deterministic(torch.tensor(math.log(2), dtype=torch.float64)).item() == pytest.approx(0.5, abs=1e-12)
    # asymmetric: sigmoid(0) * 1.2 - 0.1 = 0.5
    assert deterministic(torch.tensor(0.0), ASYMMETRIC).item() == pytest.approx(0.5, abs=1e-7)


@pytest.mark.parametrize("shape", [SYMMETRIC, ASYMMETRIC], ids=["symmetric", "asymmetric"])
def test_gradients_reach_alpha_through_the_sample(shape):
    torch.manual_seed(1)
    alpha = torch.randn(4000, dtype=torch.float64, requires_grad=True)
    z = sample(alpha, shape)
    z.sum().backward()
    grad = alpha.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    inside = (z > 0) & (z < 1)
    assert inside.any() and (~inside).any()
    # Clipped gates pass no gradient; inside, z = s (r - l) + l with s = sigmoid((noise + alpha) / beta),
    # so dz/dalpha = (r - l) s (1 - s) / beta, computable from z alone.
    assert torch.all(grad[~inside] == 0)
    s = (z.detach() - shape.l) / (shape.r - shape.l)
    torch.testing.assert_close(grad[inside], ((shape.r - shape.l) * s * (1 - s) / shape.beta)[inside])


def test_hard_concrete_module():
    torch.manual_seed(0)
    gate = HardConcrete((3, 4), init=0.0)
    assert gate.log_alpha.shape == (3, 4) and gate.log_alpha.requires_grad
    gate.train()
    first, second = gate(), gate()
    assert first.shape == (3, 4) and not torch.equal(first, second)
    gate.eval()
    assert torch.equal(gate(), gate())
    assert torch.equal(gate(), deterministic(gate.log_alpha))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-3, 3, 12).reshape(3, 4))
    assert gate.expected_l0().item() == pytest.approx(prob_nonzero(gate.log_alpha).sum().item(), abs=1e-6)
    assert gate.expected_l0().item() == pytest.approx(torch.sigmoid(torch.linspace(-3, 3, 12)).sum().item(), abs=1e-6)
    gate.expected_l0().backward()
    assert gate.log_alpha.grad is not None and (gate.log_alpha.grad > 0).all()

    default = HardConcrete(5)
    assert default.log_alpha.shape == (5,) and torch.all(default.log_alpha == 5.0)
    assert HardConcrete([2, 3]).log_alpha.shape == HardConcrete(torch.Size([2, 3])).log_alpha.shape == (2, 3)
    default.eval()
    assert torch.all(default() == 1.0)  # gates start open
    assert "l=-1.5" in repr(default)


@pytest.mark.parametrize("l, r, beta", [(0.0, 1.5, 1.0), (0.1, 1.5, 1.0), (-0.1, 1.0, 1.0), (-0.1, 0.9, 1.0),
                                        (-0.1, 1.1, 0.0), (-0.1, 1.1, -1.0)])
def test_gate_shape_rejects_bad_stretch(l, r, beta):
    with pytest.raises(ValueError, match="hard-concrete"):
        GateShape(l, r, beta)


def test_module_functions_are_the_ones_used_by_diff_pruning():
    # model.py calls gates.sample / gates.deterministic / gates.prob_nonzero through the module.
    assert gates.sample is sample and gates.prob_nonzero is prob_nonzero
