"""DiffModel's fixed mode: its start, its checks, the density lowered to the goal, the values' gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diffprune.base import load_base
from diffprune.methods.diff.model import DiffModel
from diff_helpers import EMBEDDING, randomise_w, toy_batch, wrap


@pytest.fixture
def base(tiny_model_no_dropout):
    return load_base(tiny_model_no_dropout)


def _random_positions(total: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:k].sort().values


def test_fixed_mode(base):
    k = 400
    reference = copy.deepcopy(base.model).eval()
    dm = wrap(base, k=k, structured=True)
    randomise_w(dm)
    positions = _random_positions(dm.total, k)
    positions[-1] = dm.total - 1  # the very last entry
    positions[0] = 0
    values = torch.randn(k)
    dm.fix(positions, values)
    assert dm.mode == "fixed"

    # Only the k values and the head train.
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable == {"values"} | {f"model.{n}" for n in base.head_names}

    # theta0 with the values added at their positions; untouched tensors are not in the dict.
    starts = [0]
    for n in dm.numels:
        starts.append(starts[-1] + n)
    params = dm.effective_parameters()
    dense = {}
    for i, (name, theta0) in enumerate(zip(dm.names, dm._theta0)):
        inside = (positions >= starts[i]) & (positions < starts[i + 1])
        if not inside.any():
            assert name not in params
            continue
        expected = theta0.detach().reshape(-1).clone()
        expected[positions[inside] - starts[i]] += values[inside]
        assert torch.equal(params[name].reshape(-1), expected), name
        dense[name] = expected.view_as(theta0)
    assert len(dense) > 3 and EMBEDDING in dense

    # sparse_deltas round-trips positions and values per tensor.
    sparse = dm.sparse_deltas()
    assert set(sparse) == set(dense)
    back_pos, back_val = [], []
    for i, name in enumerate(dm.names):
        if name in sparse:
            local, vals = sparse[name]
            assert local.min() >= 0 and local.max() < dm.numels[i]
            back_pos.append(local + starts[i])
            back_val.append(vals)
    assert torch.equal(torch.cat(back_pos), positions) and torch.equal(torch.cat(back_val), values)

    # The forward pass equals a plain model holding those weights.
    reference.load_state_dict(dense, strict=False)
    dm.eval()
    batch = toy_batch(5, vocab=(0, 30522))
    with torch.no_grad():
        torch.testing.assert_close(dm(**batch).logits, reference(**batch).logits, rtol=0, atol=1e-6)

    # Gradients reach the values (and only the values, among DiffModel's own tensors).
    dm.train()
    dm(**batch).loss.backward()
    assert dm.values.grad is not None and dm.values.grad.abs().sum() > 0
    assert all(w.grad is None for w in dm.w) and all(a.grad is None for a in dm.log_alpha)
    with pytest.raises(RuntimeError, match="dense and L0"):
        dm.deltas()


def test_fix_rejects_wrong_count(base):
    dm = wrap(base, k=10)
    with pytest.raises(ValueError, match="expected 10 positions"):
        dm.fix(torch.arange(9), torch.ones(9))


@pytest.mark.parametrize("positions, message", [([0, 2, 1], "sorted and distinct"), ([0, 1, 1], "sorted and distinct"),
                                               ([-1, 0, 1], "lie in"), ([0, 1, 10**9], "lie in")],
                         ids=["unsorted", "repeated", "negative", "past-the-end"])
def test_fix_rejects_positions_out_of_order_or_range(base, positions, message):
    dm = wrap(base, k=3)
    with pytest.raises(ValueError, match=message):
        dm.fix(torch.tensor(positions), torch.ones(3))


@pytest.mark.parametrize("structured", [False, True])
def test_lower_gates_to_puts_the_density_on_the_goal_and_keeps_the_order(base, structured):
    dm = wrap(base, structured=structured)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for alpha in dm.log_alpha:
            alpha.add_(torch.randn(alpha.shape, generator=g) * 3)
        if structured:
            dm.group_log_alpha.copy_(torch.linspace(6.0, -2.0, len(dm.names)))
    before = [a.detach().clone() for a in dm.log_alpha]
    groups = dm.group_log_alpha.detach().clone() if structured else None
    for goal in (0.3, 0.01, 0.001):
        c = dm.lower_gates_to(goal)
        assert c > 0 and dm.expected_density() == pytest.approx(goal, rel=2e-3)
    # One common shift of the entry logits: their order is untouched, the group gates too.
    shift = before[0].reshape(-1)[0] - dm.log_alpha[0].reshape(-1)[0]
    assert all(torch.allclose(b - a, shift.expand_as(a), atol=1e-4) for a, b in zip(dm.log_alpha, before))
    if structured:
        assert torch.equal(dm.group_log_alpha, groups)
    # Never raised: asking for more density than there is leaves the logits as they are.
    now = [a.detach().clone() for a in dm.log_alpha]
    assert dm.lower_gates_to(0.9) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(dm.log_alpha, now))


def _fixed_at_random(base, k: int, seed: int = 0) -> DiffModel:
    """A fixed-mode DiffModel over every base tensor with k random positions and values, some of
    them in the padding row and in rows the batch looks up."""
    g = torch.Generator().manual_seed(seed)
    dm = wrap(base, k=1)
    start = sum(dm.numels[:dm.names.index(EMBEDDING)])
    end, dim = start + base.model.get_parameter(EMBEDDING).numel(), base.model.config.hidden_size
    anywhere = torch.randperm(dm.total, generator=g)
    elsewhere = anywhere[(anywhere < start) | (anywhere >= end)][:k - 124]
    looked_up = torch.arange(1000, 1060).repeat_interleave(2) * dim + torch.randint(0, dim, (120,), generator=g)
    positions = torch.cat([elsewhere, start + looked_up, start + torch.arange(4)]).unique()  # row 0: [PAD]
    dm = wrap(base, k=positions.numel())
    dm.fix(positions.sort().values, torch.randn(k, generator=g)[:positions.numel()] * 0.05)
    return dm


def test_fixed_values_grad_through_layer_outputs_equals_autograd(base):
    """Linear and embedding weights take the sampled-gradient path (no dense weight gradient);
    the loss and every value's gradient equal those of autograd through the whole tensors."""
    dm = _fixed_at_random(base, k=3000)
    assert {type(m) for m in dm._sampled_owners.values()} == {nn.Linear, nn.Embedding}
    batch = toy_batch()
    results = []
    for owners in (dm._sampled_owners, {}):
        dm._sampled_owners = owners
        dm.values.grad = None
        loss = dm(**batch).loss
        loss.backward()
        results.append((loss.detach(), dm.values.grad.clone()))
    (loss, grad), (loss_ref, grad_ref) = results
    assert torch.equal(loss, loss_ref)
    assert grad_ref.abs().max() > 0 and (grad != 0).sum() > 100
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)
    for p in base.model.parameters():  # the frozen base got no gradient on either path
        assert p.grad is None or p.requires_grad


def test_fixed_sampled_grad_skips_shared_and_subclassed_layers(base):
    class Scaled(nn.Linear):  # a subclass may compute otherwise: it keeps autograd's path
        pass

    layer = base.model.bert.encoder.layer[0].intermediate.dense
    layer.__class__ = Scaled
    dm = wrap(base, k=10)
    assert "bert.encoder.layer.0.intermediate.dense.weight" not in dm._sampled_owners
    assert "bert.encoder.layer.0.output.dense.weight" in dm._sampled_owners


def test_fixed_values_grad_under_bf16_autocast(base):
    """Under CPU autocast the layers compute in bf16; the sampled path widens to float32 and
    hands the float32 values a float32 gradient equal to autograd's (bf16 rounding apart)."""
    dm = _fixed_at_random(base, k=2000, seed=1)
    batch = toy_batch(1)
    grads = []
    for owners in (dm._sampled_owners, {}):
        dm._sampled_owners = owners
        dm.values.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = dm(**batch).loss
        loss.backward()
        grads.append(dm.values.grad.clone())
    assert grads[0].dtype == torch.float32 and grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=2e-4)
