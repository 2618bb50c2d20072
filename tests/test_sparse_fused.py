"""Fused encoder layers: one compiled call per BERT-style layer gives the dense model's outputs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_other
from diffprune.pruning.targets import encoder_linear_weights
from diffprune.sparse import sparsify
from diffprune.sparse.fuse import FusedEncoderLayer

TOL = 1e-4


def _bert(hidden=32, heads=2, **config):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=300, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=160, num_labels=3, **config)).eval()


def _prune(model: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in encoder_linear_weights(model):
            params[name][torch.rand(params[name].shape, generator=g) < sparsity] = 0
    return model


def _inputs(batch, seq, vocab=300, pad_row=None):
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if pad_row is not None:
        mask[pad_row, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _fused(model):
    fused = copy.deepcopy(model)
    return fused, sparsify(fused, choose="sparse")


def test_exp_and_erf_forms_are_float32_accurate():
    from diffprune.sparse import encoder_kernel as ek

    nb = ek.nb

    @nb.njit
    def both(xs, ys):
        e, f = np.empty_like(xs), np.empty_like(ys)
        for i in range(xs.size):
            e[i] = ek.exp_nonpositive(xs[i])
            f[i] = ek.erf(ys[i])
        return e, f

    xs = np.linspace(-87, 0, 100001).astype(np.float32)
    ys = np.linspace(-7, 7, 100001).astype(np.float32)
    e, f = both(xs, ys)
    exact_e = np.exp(xs.astype(np.float64))
    assert (np.abs(e - exact_e) / exact_e).max() < 2e-7
    assert np.abs(f - np.array([math.erf(y) for y in ys.astype(np.float64)])).max() < 1e-6
    assert both(np.array([-1e4, -np.inf], np.float32), np.zeros(1, np.float32))[0].max() < 2e-38


@pytest.mark.parametrize("hidden,heads", [(32, 2), (64, 2), (128, 2)])  # head widths 16, 32, 64
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_fused_model_equals_dense(hidden, heads, sparsity):
    model = _prune(_bert(hidden, heads), sparsity)
    fused, report = _fused(model)
    assert sum(isinstance(m, FusedEncoderLayer) for m in fused.modules()) == 2
    assert "2 encoder layers run as one fused call each" in report.summary()
    # one token; padded rows; key counts past one chunk (64) and not a multiple of 8
    for inputs in (_inputs(1, 1), _inputs(3, 17, pad_row=1), _inputs(2, 70, pad_row=0), _inputs(1, 129)):
        assert (_logits(fused, inputs) - _logits(model, inputs)).abs().max() <= TOL


def test_fused_with_the_eager_attention_mask_and_two_threads():
    model = _prune(_bert(64, 2, attn_implementation="eager"), 0.9)
    fused, _ = _fused(model)
    inputs = _inputs(3, 40, pad_row=2)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert (_logits(fused, inputs) - _logits(model, inputs)).abs().max() <= TOL
            assert torch.get_num_threads() == n  # the forward pass gives torch's setting back
    finally:
        torch.set_num_threads(threads)


def test_threads_are_given_back_when_the_forward_pass_fails():
    fused, _ = _fused(_prune(_bert(), 0.9))
    threads = torch.get_num_threads()
    with pytest.raises(IndexError):
        fused(input_ids=torch.full((1, 4), 10_000))  # beyond the vocabulary
    assert torch.get_num_threads() == threads


def test_state_dict_is_unchanged_and_a_load_changes_what_is_computed():
    model = _prune(_bert(), 0.9)
    plain = copy.deepcopy(model)
    sparsify(plain, choose="sparse")
    keys = set(plain.state_dict())
    fused, _ = _fused(model)
    assert set(fused.state_dict()) >= {k for k in keys if ".layer." in k}
    other = _prune(_bert(), 0.9)  # the same pattern, other values
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    other_fused, _ = _fused(other)
    inputs = _inputs(2, 9)
    for assign in (False, True):  # values copied into the buffers, or the buffers replaced
        fused, _ = _fused(model)
        _logits(fused, inputs)  # the kernel's arguments are made once ...
        fused.load_state_dict(copy.deepcopy(other_fused.state_dict()), assign=assign)  # ... and follow a load
        assert (_logits(fused, inputs) - _logits(other, inputs)).abs().max() <= TOL
    twin = copy.deepcopy(fused)
    with torch.no_grad():
        twin.bert.encoder.layer[0].output.dense.values.mul_(2)
    assert not torch.allclose(_logits(twin, inputs), _logits(fused, inputs))


def test_training_mode_and_other_layers_run_as_transformers_wrote_them(tmp_path):
    from diffprune.base import load_base

    model = _prune(_bert(hidden_act="relu"), 0.9)  # not the exact GELU: not fused
    report = sparsify(copy.deepcopy(model), choose="sparse")
    assert report.fused_layers == [] and len(report.sparse_layers) == 12
    model = _prune(_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 0.9)
    fused, _ = _fused(model)
    fused.train()
    inputs = _inputs(2, 9)
    assert (_logits(fused, inputs) - _logits(model, inputs)).abs().max() <= TOL
    for kind, fuses in (("roberta", True), ("distilbert", False)):
        other = load_base(tiny_other(tmp_path / kind, kind)).model.eval()
        _prune(other, 0.9)
        converted = copy.deepcopy(other)
        report = sparsify(converted, choose="sparse")
        assert bool(report.fused_layers) == fuses
        inputs = _inputs(2, 11, vocab=other.config.vocab_size, pad_row=1)
        assert (_logits(converted, inputs) - _logits(other, inputs)).abs().max() <= TOL


def test_measured_choice_times_both_models_and_keeps_the_outputs():
    model = _prune(_bert(64, 2), 0.95)
    converted = copy.deepcopy(model)
    report = sparsify(converted, length=32, repeats=3)
    assert set(report.model_ms) == {"linears", "fused"}
    assert bool(report.fused_layers) == (report.model_ms["fused"] < 0.95 * report.model_ms["linears"])
    assert report.to_dict()["model_ms"] == report.model_ms
    inputs = _inputs(2, 32)
    assert (_logits(converted, inputs) - _logits(model, inputs)).abs().max() <= TOL


def test_timing_in_blocks_counts_the_settled_calls_of_every_round():
    from diffprune.sparse.timing import BLOCK, SETTLE, time_in_blocks

    calls = {"a": 0, "b": 0}

    def call(name):
        calls[name] += 1

    times = time_in_blocks({name: (lambda n=name: call(n)) for name in calls}, repeats=7, warmup_rounds=1)
    rounds = 1 + -(-7 // (BLOCK - SETTLE))
    assert {len(t) for t in times.values()} == {7} and all(t >= 0 for t in times["a"] + times["b"])
    assert calls == {"a": rounds * BLOCK, "b": rounds * BLOCK}


def test_empty_and_fully_dense_rows_inside_a_fused_layer():
    model = _prune(_bert(64, 2), 0.9)
    with torch.no_grad():
        layer = model.bert.encoder.layer[1]
        layer.attention.self.key.weight[5] = 0  # an empty row
        layer.intermediate.dense.weight[7] = torch.randn(64)  # a fully dense row
        layer.output.dense.weight[:, 3] = 0  # a column no row reads
    fused, report = _fused(model)
    assert len(report.fused_layers) == 2
    for inputs in (_inputs(1, 1), _inputs(2, 33, pad_row=1)):
        assert (_logits(fused, inputs) - _logits(model, inputs)).abs().max() <= TOL


def test_a_gradient_is_refused_as_by_the_sparse_layers():
    from diffprune.errors import DiffpruneError

    fused, _ = _fused(_prune(_bert(), 0.9))
    with pytest.raises(DiffpruneError, match="computes no gradient"):
        fused(**_inputs(1, 5))  # parameters require gradients, and none is switched off
