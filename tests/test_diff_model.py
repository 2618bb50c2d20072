"""DiffModel: theta0 + delta over a shared frozen base, in the dense, L0 and fixed modes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from diffprune import gates
from diffprune.base import load_base
from diffprune.methods.diff.model import DiffModel
from diff_helpers import EMBEDDING, added_tensors, randomise_w, toy_batch, wrap


@pytest.fixture
def base(tiny_model_no_dropout):
    return load_base(tiny_model_no_dropout)


@pytest.mark.parametrize("structured, velocity", [(False, False), (True, False), (True, True)])
def test_base_is_shared_not_copied(base, structured, velocity):
    params = dict(base.model.named_parameters())
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    k = 123
    dm = wrap(base, k=k, structured=structured, track_gate_velocity=velocity)
    assert dm.model is base.model
    after = dict(base.model.named_parameters())
    assert all(after[n] is params[n] and after[n].data_ptr() == ptrs[n] for n in params)
    assert all(t is params[n] for t, n in zip(dm._theta0, base.base_names))
    assert not any(params[n].requires_grad for n in base.base_names)  # frozen
    assert all(params[n].requires_grad for n in base.head_names)  # the head still trains

    added = added_tensors(dm)
    names = list(base.base_names)
    expected = {f"w.{i}" for i in range(len(names))} | {f"log_alpha.{i}" for i in range(len(names))}
    expected |= {"values", "positions", "offsets", "mode_index", "l0_lambda", "learned_density", "logit_average"}
    if structured:
        expected.add("group_log_alpha")
    assert set(added) == expected
    for i, n in enumerate(names):
        assert added[f"w.{i}"].shape == params[n].shape == added[f"log_alpha.{i}"].shape
        assert added[f"w.{i}"].data_ptr() != ptrs[n]
    # Bytes: w and the gate logits (fp32, one each per base entry), the group gates, k values (fp32)
    # and k positions (int64), the offsets, and three scalars (mode, lambda, learned density);
    # for --controller-lookahead, one more fp32 per gate logit (their moving average).
    total = base.num_base_params
    assert dm.total == total
    gate_logits = total + (len(names) if structured else 0)
    expected_bytes = (4 * total + 4 * gate_logits + 4 * k + 8 * k + 8 * (len(names) + 1) + 8 + 8 + 8
                      + (4 * gate_logits if velocity else 0))
    assert sum(t.numel() * t.element_size() for t in added.values()) == expected_bytes


@pytest.mark.parametrize("structured", [False, True])
def test_eval_with_open_gates_equals_model_with_theta0_plus_w(base, structured):
    reference = copy.deepcopy(base.model)
    dm = wrap(base, structured=structured, alpha_init=5.0)
    randomise_w(dm)
    dm.eval()
    assert torch.all(gates.deterministic(torch.tensor(5.0)) == 1.0)
    state = {n: t0.detach() + w.detach() for n, t0, w in zip(dm.names, dm._theta0, dm.w)}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= set(base.head_names) | {n for n, _ in reference.named_buffers()}
    reference.eval()
    batch = toy_batch()
    with torch.no_grad():
        out, ref = dm(**batch), reference(**batch)
    assert not torch.allclose(ref.logits, base.model(**batch).logits)  # w really changes the model
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)


def test_closed_gates_give_the_base(base):
    plain = copy.deepcopy(base.model).eval()
    dm = wrap(base, structured=True, alpha_init=-5.0)  # deterministic gate 0: delta = 0
    randomise_w(dm)
    dm.eval()
    batch = toy_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(dm(**batch).logits, plain(**batch).logits, rtol=0, atol=0)


def _loss_and_grads(dm: DiffModel, batch, rows_trick: bool):
    for p in dm.parameters():
        p.grad = None
    if rows_trick:
        loss = dm(**batch).loss
    else:  # the whole embedding matrix gated: no input_ids handed to effective_parameters
        loss = functional_call(dm.model, dm.effective_parameters(None), args=(), kwargs=batch, strict=False).loss
    loss.backward()
    i = dm.names.index(EMBEDDING)
    return loss.detach(), {n: p.grad.clone() for n, p in dm.named_parameters() if p.grad is not None}, i


def _check_rows_trick(dm, batch, atol=1e-6):
    loss_rows, grads_rows, i = _loss_and_grads(dm, batch, rows_trick=True)
    loss_full, grads_full, _ = _loss_and_grads(dm, batch, rows_trick=False)
    torch.testing.assert_close(loss_rows, loss_full, rtol=0, atol=atol)
    assert set(grads_rows) == set(grads_full)
    for name in grads_full:
        torch.testing.assert_close(grads_rows[name], grads_full[name], rtol=1e-5, atol=atol, msg=name)
    present = batch["input_ids"].unique()
    absent = torch.ones(dm.w[i].shape[0], dtype=torch.bool)
    absent[present] = False
    g = grads_rows[f"w.{i}"]
    assert g[present].abs().sum() > 0 and torch.all(g[absent] == 0)
    assert torch.all(grads_rows[f"log_alpha.{i}"][absent] == 0)
    return grads_rows


@pytest.mark.parametrize("structured", [False, True])
def test_embedding_rows_trick_is_exact_in_eval(base, structured):
    # alpha = log 2: the deterministic gate is 0.5, strictly inside (0, 1), so alpha gets gradients too.
    dm = wrap(base, structured=structured, alpha_init=math.log(2))
    randomise_w(dm)
    dm.eval()
    grads = _check_rows_trick(dm, toy_batch(2))
    assert grads["log_alpha.0"].abs().sum() > 0


def test_embedding_rows_trick_is_exact_in_training(base, monkeypatch):
    """In training the gates are sampled; give each entry noise that is a function of the entry
    (of its distinct alpha), so the rows-only and the whole-matrix computation draw the same z."""

    def keyed_sample(alpha, shape=gates.GateShape()):
        u = torch.frac(torch.sin(alpha.detach() * 12.9898) * 43758.5453).abs().clamp(1e-3, 1 - 1e-3)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + alpha) / shape.beta)
        return (s * (shape.r - shape.l) + shape.l).clamp(0, 1)

    dm = wrap(base, structured=True, alpha_init=0.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a in dm.log_alpha:
            a.copy_(torch.randn(a.shape, generator=g))  # distinct alphas: distinct noise per entry
        dm.group_log_alpha.copy_(3 + torch.rand(dm.group_log_alpha.shape, generator=g))  # mostly open
    randomise_w(dm, seed=3)
    dm.train()
    monkeypatch.setattr(gates, "sample", keyed_sample)
    _check_rows_trick(dm, toy_batch(3))


def test_training_samples_gates_for_batch_rows_only(base, monkeypatch):
    dm = wrap(base, alpha_init=0.0)
    randomise_w(dm)
    dm.train()
    batch = toy_batch(4)
    sampled, real_sample = [], gates.sample

    def recording_sample(alpha, shape):
        sampled.append(tuple(alpha.shape))
        return real_sample(alpha, shape)

    monkeypatch.setattr(gates, "sample", recording_sample)
    torch.manual_seed(0)
    dm(**batch).loss.backward()
    i = dm.names.index(EMBEDDING)
    present = batch["input_ids"].unique()
    # One sample per diffed tensor, and for the embedding only the rows the batch reads.
    assert len(sampled) == len(dm.names)
    assert sampled[i] == (present.numel(), 32) and (30522, 32) not in sampled
    rows = dm.deltas(batch["input_ids"])[i][0]
    assert torch.equal(rows, present)
    grad = dm.w[i].grad
    # Only rows in the batch can get a gradient (a row whose gates all sampled 0 gets none).
    nonzero_rows = grad.abs().sum(1).nonzero().squeeze(1)
    assert set(nonzero_rows.tolist()) <= set(present.tolist()) and nonzero_rows.numel() > 0
    # Same seed, same samples: training mode is reproducible.
    torch.manual_seed(0)
    first = dm(**batch).loss
    torch.manual_seed(0)
    assert torch.equal(first, dm(**batch).loss)


def test_an_embedding_tied_to_an_output_layer_is_gated_whole():
    """The rows-only shortcut is exact only if the loss reads just the batch's rows; a tied
    language-model head reads every row, so there the whole matrix is gated."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, tie_word_embeddings=True)
    tied = BertForMaskedLM(config)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    names = [n for n, _ in tied.named_parameters()]
    assert DiffModel(tied, names, 3, structured=False)._embedding_index is None
    config.tie_word_embeddings = False
    untied = BertForMaskedLM(config)
    dm = DiffModel(untied, [n for n, _ in untied.named_parameters()], 3, structured=False)
    assert dm._theta0[dm._embedding_index] is untied.get_input_embeddings().weight


def test_an_encoder_decoder_embedding_is_gated_whole():
    """A T5 classifier's decoder starts from a token the batch's input_ids need not hold."""
    from transformers import T5Config, T5ForSequenceClassification

    config = T5Config(vocab_size=50, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                      tie_word_embeddings=False, num_labels=2)
    model = T5ForSequenceClassification(config)
    names = [n for n, _ in model.named_parameters()]
    assert DiffModel(model, names, 3, structured=False)._embedding_index is None


def test_modes_choose_what_trains(base):
    dm = wrap(base, structured=True, mode="dense")
    assert dm.mode == "dense"
    assert all(w.requires_grad for w in dm.w) and not any(a.requires_grad for a in dm.log_alpha)
    assert not dm.group_log_alpha.requires_grad and not dm.values.requires_grad
    randomise_w(dm)
    dm.train()  # dense: delta = w, no gates, even in training
    deltas = dm.deltas()
    assert all(rows is None and torch.equal(d, w) for (rows, d), w in zip(deltas, dm.w))
    dm.set_mode("l0")
    assert all(a.requires_grad for a in dm.log_alpha) and dm.group_log_alpha.requires_grad
    assert all(w.requires_grad for w in dm.w) and not dm.values.requires_grad


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)  # weight 6 entries, bias 2

    def forward(self, x):
        return self.lin(x)


def _toy(structured: bool) -> DiffModel:
    dm = DiffModel(_Toy(), ["lin.weight", "lin.bias"], 3, structured=structured)
    with torch.no_grad():
        dm.log_alpha[0].fill_(0.0)  # P(z != 0) = sigmoid(0) = 1/2, six entries: 3
        dm.log_alpha[1].fill_(math.log(3))  # sigmoid(log 3) = 3/4, two entries: 1.5
        if structured:
            dm.group_log_alpha.copy_(torch.tensor([0.0, math.log(3)]))  # groups: 1/2 and 3/4
    return dm


def test_expected_l0_product_and_additive_pinned():
    assert _toy(False).expected_l0().item() == pytest.approx(4.5)
    assert _toy(False).expected_density() == pytest.approx(4.5 / 8)
    dm = _toy(True)
    assert dm.expected_l0("product").item() == pytest.approx(3 * 0.5 + 1.5 * 0.75)  # 2.625
    assert dm.expected_l0("additive").item() == pytest.approx(3 + 0.5 + 1.5 + 0.75)  # 5.75
    assert dm.expected_density() == pytest.approx(2.625 / 8)
    # Differentiable in every gate logit.
    dm.expected_l0("product").backward()
    assert all(a.grad is not None and (a.grad > 0).all() for a in dm.log_alpha)
    assert (dm.group_log_alpha.grad > 0).all()


def test_toy_model_without_input_embeddings():
    dm = _toy(False)
    assert dm._embedding_index is None
    dm.eval()
    # weight gates at alpha 0 are closed (0.5 * 3 - 1.5 = 0); bias gates at log 3: 0.75 * 3 - 1.5 = 0.75
    assert torch.all(gates.deterministic(dm.log_alpha[0]) == 0)
    torch.testing.assert_close(gates.deterministic(dm.log_alpha[1]), torch.full((2,), 0.75))
    with torch.no_grad():
        dm.w[0].fill_(0.1)
        dm.w[1].fill_(0.2)
    x = torch.randn(4, 3)
    out = functional_call(dm.model, dm.effective_parameters(), (x,), strict=False)
    expected = x @ dm.model.lin.weight.T + dm.model.lin.bias + 0.75 * 0.2  # only the bias moves
    torch.testing.assert_close(out, expected)
