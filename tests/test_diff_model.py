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

EMBEDDING = "bert.embeddings.word_embeddings.weight"


@pytest.fixture
def base(tiny_model_no_dropout):
    return load_base(tiny_model_no_dropout)


def _batch(seed: int = 0, vocab: tuple[int, int] = (1000, 1060)) -> dict[str, torch.Tensor]:
    """Three padded sequences over a small slice of the vocabulary (so most embedding rows are unused)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(*vocab, (3, 10), generator=g)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones_like(ids)
    ids[2, 7:], mask[2, 7:] = 0, 0  # padding
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1, 1])}


def _wrap(base, k=100, structured=False, **kw) -> DiffModel:
    return DiffModel(base.model, list(base.base_names), k, structured=structured, **kw)


def _randomise_w(dm: DiffModel, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in dm.w:
            w.copy_(torch.randn(w.shape, generator=g) * scale)


def _added(dm: DiffModel) -> dict[str, torch.Tensor]:
    """Tensors that DiffModel holds itself (not those of the wrapped model)."""
    tensors = {**dict(dm.named_parameters()), **dict(dm.named_buffers())}
    return {n: t for n, t in tensors.items() if not n.startswith("model.")}


@pytest.mark.parametrize("structured, velocity", [(False, False), (True, False), (True, True)])
def test_base_is_shared_not_copied(base, structured, velocity):
    params = dict(base.model.named_parameters())
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    k = 123
    dm = _wrap(base, k=k, structured=structured, track_gate_velocity=velocity)
    assert dm.model is base.model
    after = dict(base.model.named_parameters())
    assert all(after[n] is params[n] and after[n].data_ptr() == ptrs[n] for n in params)
    assert all(t is params[n] for t, n in zip(dm._theta0, base.base_names))
    assert not any(params[n].requires_grad for n in base.base_names)  # frozen
    assert all(params[n].requires_grad for n in base.head_names)  # the head still trains

    added = _added(dm)
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
    dm = _wrap(base, structured=structured, alpha_init=5.0)
    _randomise_w(dm)
    dm.eval()
    assert torch.all(gates.deterministic(torch.tensor(5.0)) == 1.0)
    state = {n: t0.detach() + w.detach() for n, t0, w in zip(dm.names, dm._theta0, dm.w)}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= set(base.head_names) | {n for n, _ in reference.named_buffers()}
    reference.eval()
    batch = _batch()
    with torch.no_grad():
        out, ref = dm(**batch), reference(**batch)
    assert not torch.allclose(ref.logits, base.model(**batch).logits)  # w really changes the model
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)


def test_closed_gates_give_the_base(base):
    plain = copy.deepcopy(base.model).eval()
    dm = _wrap(base, structured=True, alpha_init=-5.0)  # deterministic gate 0: delta = 0
    _randomise_w(dm)
    dm.eval()
    batch = _batch(1)
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
    dm = _wrap(base, structured=structured, alpha_init=math.log(2))
    _randomise_w(dm)
    dm.eval()
    grads = _check_rows_trick(dm, _batch(2))
    assert grads["log_alpha.0"].abs().sum() > 0


def test_embedding_rows_trick_is_exact_in_training(base, monkeypatch):
    """In training the gates are sampled; give each entry noise that is a function of the entry
    (of its distinct alpha), so the rows-only and the whole-matrix computation draw the same z."""

    def keyed_sample(alpha, shape=gates.GateShape()):
        u = torch.frac(torch.sin(alpha.detach() * 12.9898) * 43758.5453).abs().clamp(1e-3, 1 - 1e-3)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + alpha) / shape.beta)
        return (s * (shape.r - shape.l) + shape.l).clamp(0, 1)

    dm = _wrap(base, structured=True, alpha_init=0.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a in dm.log_alpha:
            a.copy_(torch.randn(a.shape, generator=g))  # distinct alphas: distinct noise per entry
        dm.group_log_alpha.copy_(3 + torch.rand(dm.group_log_alpha.shape, generator=g))  # mostly open
    _randomise_w(dm, seed=3)
    dm.train()
    monkeypatch.setattr(gates, "sample", keyed_sample)
    _check_rows_trick(dm, _batch(3))


def test_training_samples_gates_for_batch_rows_only(base, monkeypatch):
    dm = _wrap(base, alpha_init=0.0)
    _randomise_w(dm)
    dm.train()
    batch = _batch(4)
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


def _random_positions(total: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:k].sort().values


def test_fixed_mode(base):
    k = 400
    reference = copy.deepcopy(base.model).eval()
    dm = _wrap(base, k=k, structured=True)
    _randomise_w(dm)
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
    batch = _batch(5, vocab=(0, 30522))
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
    dm = _wrap(base, k=10)
    with pytest.raises(ValueError, match="expected 10 positions"):
        dm.fix(torch.arange(9), torch.ones(9))


@pytest.mark.parametrize("positions, message", [([0, 2, 1], "sorted and distinct"), ([0, 1, 1], "sorted and distinct"),
                                               ([-1, 0, 1], "lie in"), ([0, 1, 10**9], "lie in")],
                         ids=["unsorted", "repeated", "negative", "past-the-end"])
def test_fix_rejects_positions_out_of_order_or_range(base, positions, message):
    dm = _wrap(base, k=3)
    with pytest.raises(ValueError, match=message):
        dm.fix(torch.tensor(positions), torch.ones(3))


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
    dm = _wrap(base, structured=True, mode="dense")
    assert dm.mode == "dense"
    assert all(w.requires_grad for w in dm.w) and not any(a.requires_grad for a in dm.log_alpha)
    assert not dm.group_log_alpha.requires_grad and not dm.values.requires_grad
    _randomise_w(dm)
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


@pytest.mark.parametrize("structured", [False, True])
def test_lower_gates_to_puts_the_density_on_the_goal_and_keeps_the_order(base, structured):
    dm = _wrap(base, structured=structured)
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
    dm = _wrap(base, k=1)
    start = sum(dm.numels[:dm.names.index(EMBEDDING)])
    end, dim = start + base.model.get_parameter(EMBEDDING).numel(), base.model.config.hidden_size
    anywhere = torch.randperm(dm.total, generator=g)
    elsewhere = anywhere[(anywhere < start) | (anywhere >= end)][:k - 124]
    looked_up = torch.arange(1000, 1060).repeat_interleave(2) * dim + torch.randint(0, dim, (120,), generator=g)
    positions = torch.cat([elsewhere, start + looked_up, start + torch.arange(4)]).unique()  # row 0: [PAD]
    dm = _wrap(base, k=positions.numel())
    dm.fix(positions.sort().values, torch.randn(k, generator=g)[:positions.numel()] * 0.05)
    return dm


def test_fixed_values_grad_through_layer_outputs_equals_autograd(base):
    """Linear and embedding weights take the sampled-gradient path (no dense weight gradient);
    the loss and every value's gradient equal those of autograd through the whole tensors."""
    dm = _fixed_at_random(base, k=3000)
    assert {type(m) for m in dm._sampled_owners.values()} == {nn.Linear, nn.Embedding}
    batch = _batch()
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
    dm = _wrap(base, k=10)
    assert "bert.encoder.layer.0.intermediate.dense.weight" not in dm._sampled_owners
    assert "bert.encoder.layer.0.output.dense.weight" in dm._sampled_owners


def test_fixed_values_grad_under_bf16_autocast(base):
    """Under CPU autocast the layers compute in bf16; the sampled path widens to float32 and
    hands the float32 values a float32 gradient equal to autograd's (bf16 rounding apart)."""
    dm = _fixed_at_random(base, k=2000, seed=1)
    batch = _batch(1)
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
