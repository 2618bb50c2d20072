"""Diff pruning's projection to the exact budget and the fixed phase's start, on a prepared model
(no training), and SHiRA's entries and rank from a budget."""

from __future__ import annotations

import math

import pytest
import torch

from diffprune.base import load_base
from diffprune.methods import build_method
from diffprune.pruning.topk import budget_count, top_k
from diffprune.methods.shira import linear_layers


# -- the projection and the fixed-phase start, on a prepared model (no training) -------------
def _prepared(tiny_model, options, seed=1234, method_name="diff"):
    # (Not seed 0: the gate noise below comes from the global generator seeded 0, and the same
    # seed would make w and the noise the same stream, i.e. correlated.)
    base = load_base(tiny_model)
    method = build_method(method_name, options)
    model = method.prepare(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w, a in zip(model.w, model.log_alpha):
            w.copy_(torch.randn(w.shape, generator=g))
            # Half the gates at log 2 (deterministic gate 0.5, P(z != 0) = 2/3), half nearly closed.
            a.copy_(torch.where(torch.rand(a.shape, generator=g) < 0.5, math.log(2), -5.0))
    w = torch.cat([p.detach().reshape(-1) for p in model.w])
    alpha = torch.cat([p.detach().reshape(-1) for p in model.log_alpha])
    model.train()
    return method, model, w, alpha


@pytest.mark.parametrize("patch_dtype", ["float32", "float16", "bfloat16"])
def test_finish_leaves_the_values_the_patch_stores_so_the_recorded_score_is_the_patchs(tiny_model, patch_dtype):
    method, model, _, _ = _prepared(tiny_model, {"budget": 300, "patch_dtype": patch_dtype})
    method._project(model)
    with torch.no_grad():
        model.values.copy_(torch.linspace(-0.3, 0.3, 300) + 1e-5)  # most not representable in 16 bits
    before = model.values.detach().clone()
    method.finish(model)
    dtype = getattr(torch, patch_dtype)
    assert torch.equal(model.values.detach(), before.to(dtype).float())
    assert patch_dtype == "float32" or not torch.equal(model.values.detach(), before)
    if patch_dtype == "float16":  # a value fp16 cannot hold is left for save's clear error, not scored as inf
        with torch.no_grad():
            model.values[0] = 1e6
        method.finish(model)
        assert model.values[0].item() == 1e6


@pytest.mark.parametrize("fixed_init", ["projected", "w"])
def test_deterministic_projection_and_fixed_init(tiny_model, fixed_init):
    method, model, w, alpha = _prepared(tiny_model, {"budget": 300, "projection": "deterministic",
                                                     "fixed_init": fixed_init})
    method._project(model)
    gate = torch.where(alpha == math.log(2), 0.5, 0.0)  # sigmoid(log 2) * 3 - 1.5 = 0.5; alpha -5: 0
    delta = gate * w
    expected = top_k(delta.abs(), 300)
    assert model.mode == "fixed" and model.training
    assert torch.equal(model.positions, expected)
    start = delta if fixed_init == "projected" else w
    torch.testing.assert_close(model.values.detach(), start[expected], rtol=1e-6, atol=0)
    assert float(model.learned_density) == pytest.approx(float((delta != 0).double().mean()))


def test_sampled_projection(tiny_model):
    method, model, w, alpha = _prepared(tiny_model, {"budget": 300})
    model.eval()  # the projection samples the gates whatever mode it is called in
    torch.manual_seed(0)
    method._project(model)
    positions = model.positions
    ratio = model.values.detach() / w[positions]  # the sampled gate of each kept entry
    assert torch.all((ratio >= 0) & (ratio <= 1 + 1e-6))
    assert (alpha[positions] == math.log(2)).float().mean() > 0.9  # open gates win the top-k
    # One draw: P(z != 0) is 2/3 for half the entries and sigmoid(-5) for the other half.
    assert float(model.learned_density) == pytest.approx(0.5 * 2 / 3 + 0.5 * torch.sigmoid(torch.tensor(-5.0)).item(),
                                                         abs=0.005)


def test_projection_fills_a_shortfall_by_the_expected_change_group_gate_included(tiny_model):
    """Every entry gate shut (deterministic gate 0), so no entry of z * w is nonzero and the whole
    budget is the fill |w| * P(z != 0) * P(z_group != 0): a tensor whose group gate is shut
    gets nothing, however large its w."""
    method, model, w, alpha = _prepared(tiny_model, {"budget": 300, "projection": "deterministic"},
                                        method_name="diff-struct")
    shut = max(range(len(model.names)), key=model.numels.__getitem__)
    with torch.no_grad():
        for a in model.log_alpha:
            a.fill_(-1.0)  # sigmoid(-1) * 3 - 1.5 < 0: deterministic gate 0, P(z != 0) = sigmoid(-1 + log 3) > 0
        model.w[shut].mul_(1000.0)
        model.group_log_alpha.fill_(5.0)
        model.group_log_alpha[shut] = -20.0
    method._project(model)
    assert float(model.learned_density) == 0.0
    sizes = [0] + model.numels
    start, end = sum(sizes[: shut + 1]), sum(sizes[: shut + 2])
    assert not ((model.positions >= start) & (model.positions < end)).any()
    w = torch.cat([p.detach().reshape(-1) for p in model.w])
    outside = torch.cat([w[:start], w[end:]]).abs()
    assert w[model.positions].abs().min() >= outside.topk(300).values.min()  # the largest |w| elsewhere


# -- SHiRA ------------------------------------------------------------------------------------
def test_shira_entries_and_rank_from_budget(tiny_model):
    base = load_base(tiny_model)
    layers = linear_layers(base)
    assert "classifier" not in layers and len(layers) == 2 * 6 + 1  # 6 per layer, and the pooler
    per_rank = sum(m.in_features + m.out_features for m in layers.values())
    sizes = {name: (m.in_features, m.out_features) for name, m in layers.items()}
    method = build_method("shira", {"budget": 0.01})
    model = method.prepare(base)
    k = budget_count(0.01, base.num_base_params)
    assert method.r == round(k / per_rank) == 10
    assert method.entries == method.r * per_rank
    # r * (m + n) trainable entries in every linear layer of the base.
    found = {}
    for name, p in model.named_parameters():
        if p.requires_grad and "shira" in name:
            module = name.split("base_model.model.", 1)[1].rsplit(".shira_weight", 1)[0]
            found[module] = p.numel()
    assert found == {name: method.r * (m + n) for name, (m, n) in sizes.items()}

    explicit = build_method("shira", {"shira_r": 3})
    explicit.prepare(load_base(tiny_model))
    assert explicit.r == 3 and explicit.entries == 3 * per_rank
