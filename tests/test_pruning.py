"""The pruning pieces: which tensors, exact counts per scope, schedules, the straight-through mask,
and the masked model that leaves its base untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

from diffprune.errors import DiffpruneError
from diffprune.pruning.masked import MaskedModel, straight_through_mask
from diffprune.pruning.schedule import PruningSchedule
from diffprune.pruning.targets import encoder_linear_weights, prune_targets
from diffprune.pruning.topk import keep_masks, top_positions

SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=50,
             max_position_embeddings=40)


def _bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**SMALL))


# -- targets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: BertForSequenceClassification(BertConfig(**SMALL)),
    lambda: RobertaForSequenceClassification(RobertaConfig(**{**SMALL, "max_position_embeddings": 42})),
    lambda: DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2,
                                                                 hidden_dim=24, max_position_embeddings=40)),
])
def test_the_encoders_linear_weights_are_found_by_type_whatever_their_names(build):
    model = build()
    names = encoder_linear_weights(model)
    assert len(names) == 2 * 6  # q, k, v, attention output, two FFN matrices per layer
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n.rsplit(".", 1)[0]], nn.Linear) for n in names)
    assert not any(word in n for n in names for word in ("embeddings", "pooler", "classifier", "pre_classifier"))
    order = [n for n, _ in model.named_parameters()]
    assert names == sorted(names, key=order.index)


def test_prune_targets_by_glob_and_a_glob_that_matches_nothing():
    model = _bert()
    base_names = tuple(n for n, _ in model.named_parameters() if not n.startswith("classifier"))
    assert prune_targets(model, base_names, "") == encoder_linear_weights(model)
    assert prune_targets(model, base_names, "*.query.weight, *.key.weight") == [
        f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in range(2) for m in ("query", "key")]
    with pytest.raises(DiffpruneError, match="no base parameter matches --prune-include 'nothing.*'"):
        prune_targets(model, base_names, "nothing.*")


# -- exact counts per scope ----------------------------------------------------------------------
def _scores(sizes=((10,), (30,), (7, 9))):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(s, generator=g) for s in sizes]


@pytest.mark.parametrize("k", [1, 17, 50, 103])
def test_scopes_keep_exactly_what_they_promise(k):
    scores = _scores()
    sizes = [s.numel() for s in scores]
    total = sum(sizes)
    for scope in ("global", "per-tensor"):
        assert top_positions(scores, k, scope).numel() == k
    per_matrix = keep_masks(scores, k, "per-matrix")
    assert [int(m.sum()) for m in per_matrix] == [round(k * n / total) for n in sizes]
    # each tensor's kept entries are its own largest scores
    for s, m in zip(scores, per_matrix):
        if m.any() and not m.all():
            assert s[m].min() > s[~m].max()


# -- schedules -----------------------------------------------------------------------------------
def test_cubic_schedule_in_events_pinned():
    schedule = PruningSchedule("cubic", final=0.9, events=4, begin=0.0, reach=1.0)
    values = {step: schedule.sparsity(step, 100) for step in (0, 24, 25, 49, 50, 75, 99, 100, 120)}
    assert values[0] == values[24] == 0.0
    assert values[25] == values[49] == pytest.approx(0.9 - 0.9 * 0.75 ** 3)
    assert values[50] == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    assert values[75] == values[99] == pytest.approx(0.9 - 0.9 * 0.25 ** 3)
    assert values[100] == values[120] == pytest.approx(0.9)
    assert len({schedule.sparsity(step, 1000) for step in range(1001)}) == 5  # 0 and the 4 events


def test_cubic_schedule_span_and_one_shot():
    schedule = PruningSchedule("cubic", final=0.5, events=100, begin=0.25, reach=0.75)
    assert schedule.sparsity(249, 1000) == 0.0 and schedule.sparsity(750, 1000) == pytest.approx(0.5)
    distinct = {schedule.sparsity(step, 1000) for step in range(1001)}
    assert len(distinct) == 101 and max(distinct) == pytest.approx(0.5)
    assert PruningSchedule("one-shot", final=0.7).sparsity(0, 10) == 0.7
    with pytest.raises(DiffpruneError, match="unknown pruning schedule"):
        PruningSchedule("linear")


# -- the straight-through mask ---------------------------------------------------------------------
def test_straight_through_mask_is_a_step_forward_and_a_sigmoid_slope_backward():
    scores = torch.tensor([-0.02, -1e-3, 1e-3, 0.5], requires_grad=True)
    mask = straight_through_mask(scores, t_forward=1e5, t_backward=1.0)
    assert mask.tolist() == [0.0, 0.0, 1.0, 1.0]
    mask.sum().backward()
    s = torch.sigmoid(scores.detach())
    torch.testing.assert_close(scores.grad, s * (1 - s))


# -- the masked model -------------------------------------------------------------------------------
def _inputs():
    ids = torch.randint(5, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_a_fixed_mask_equals_zeroed_weights_and_the_base_never_changes():
    model = _bert().eval()
    names = encoder_linear_weights(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masked = MaskedModel(model, names, learned=False)
    masks = keep_masks([model.get_parameter(n).abs() for n in names], 300, "global")
    masked.fix(masks)
    zeroed = _bert().eval()
    with torch.no_grad():
        for n, m in zip(names, masks):
            zeroed.get_parameter(n).mul_(m)
        assert torch.equal(masked(**_inputs()).logits, zeroed(**_inputs()).logits)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert masked.kept_entries() == 300


def test_learned_scores_train_and_a_pruned_connection_can_come_back():
    model = _bert().train()
    names = encoder_linear_weights(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masked = MaskedModel(model, names, learned=True, generator=torch.Generator().manual_seed(0))
    assert masked.sparsity() == 0.0  # N(0.01, 0.001^2): every entry starts kept
    with torch.no_grad():
        masked.scores[0][0, 0] = -0.005  # pruned
    optimizer = torch.optim.SGD(masked.scores, lr=1.0)
    for _ in range(3):  # a loss that wants that one connection back (its weight times its mask, up)
        out = masked(**_inputs())
        weight = model.get_parameter(names[0])[0, 0]
        mask = straight_through_mask(masked.scores[0][0, 0], 1e5, 1.0)
        loss = out.logits.sum() * 0 - torch.sign(weight) * weight * mask
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert masked.scores[0][0, 0] > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # base weights unchanged


def test_scores_started_by_magnitude_rank_entries_as_magnitude_pruning_does():
    model = _bert()
    names = encoder_linear_weights(model)
    masked = MaskedModel(model, names, learned=True, init_by_magnitude=True)
    assert masked.sparsity() == 0.0  # every nonzero weight starts kept
    for name, score in zip(names, masked.scores):
        weight = model.get_parameter(name)
        assert torch.equal(score.detach().reshape(-1).argsort(stable=True),
                           weight.abs().reshape(-1).argsort(stable=True))
        assert score.detach().mean().item() == pytest.approx(0.01, rel=1e-5)
    by_scores = keep_masks([s.detach() for s in masked.scores], masked.total // 2, "per-matrix")
    by_weights = keep_masks([model.get_parameter(n).abs() for n in names], masked.total // 2, "per-matrix")
    assert all(torch.equal(a, b) for a, b in zip(by_scores, by_weights))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_shifting_the_scores_keeps_exactly_the_count_and_their_order(per_tensor):
    masked = MaskedModel(_bert(), encoder_linear_weights(_bert()), learned=True,
                         generator=torch.Generator().manual_seed(0))
    order = torch.cat([s.detach().reshape(-1) for s in masked.scores]).argsort()
    kept = masked.total // 3
    assert masked.shift_scores_to(kept, per_tensor) > 0
    assert masked.kept_entries() == kept
    assert torch.equal(torch.cat([s.detach().reshape(-1) for s in masked.scores]).argsort(), order) or per_tensor
    assert masked.shift_scores_to(masked.total, per_tensor) == 0.0  # never raised
    assert masked.kept_entries() == kept
