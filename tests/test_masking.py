"""Adapting by pruning and its baselines end to end on the tiny BERT and the MRPC fixtures:
exact sparsity, the stop rule (also across a resume), untouched base weights, the mask patch as
deployed (eval, export), and bad options refused before anything loads."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import GLUE_FIXTURES, run_cache, run_cli, train_in_process
from diffprune import api
from diffprune.base import load_base
from diffprune.errors import DiffpruneError
from diffprune.methods import build_method
from diffprune.methods.masking.method import MaskMethod
from diffprune.patch import TaskPatch, export_model
from diffprune.pruning.targets import encoder_linear_weights

GLUE = str(GLUE_FIXTURES)
# 24 examples, batch 8: 3 steps per epoch. abp's phase of 2 epochs has 6 steps; the shift puts
# the sparsity at its target at --prune-reach 0.75 of them, step 4.5, so the stop fires at step 5.
ABP = dict(epochs=2, checkpoint_every=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    return run_cache(tmp_path_factory, tiny_model)


def _log(out, name):
    with open(out / "log.csv", newline="") as f:
        return [(int(r["step"]), r["phase"], float(r["value"])) for r in csv.DictReader(f) if r["name"] == name]


def test_abp_stops_when_the_sparsity_is_reached_then_trains_the_head(runs):
    out, record, _ = runs("abp", "abp", {"sparsity": 0.5}, **ABP)
    assert record["reached_at_step"] == 5
    assert [(e["phase"], e["step"]) for e in record["evals"]] == [("abp", 3), ("abp", 5), ("head", 8)]
    sparsity = {step: value for step, phase, value in _log(out, "sparsity") if phase == "abp"}
    assert sparsity[1] == 0.0 and 0 < sparsity[2] < sparsity[3] < sparsity[4] < 0.5 <= sparsity[5]
    assert record["sparsity"] == 0.5 and record["target_sparsity"] == 0.5


def test_abp_resumed_after_its_stop_does_not_train_the_pruning_phase_again(runs, tiny_model, tmp_path, monkeypatch):
    _, uninterrupted, logits = runs("abp", "abp", {"sparsity": 0.5}, **ABP)
    original = MaskMethod.make_exact

    def crash(self, model):  # the process dies as the last phase begins, after the stop's checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(MaskMethod, "make_exact", crash)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(tmp_path, tiny_model, "abp", {"sparsity": 0.5}, **ABP)
    monkeypatch.setattr(MaskMethod, "make_exact", original)
    record, resumed_logits = train_in_process(tmp_path, tiny_model, "abp", {"sparsity": 0.5}, resume=True, **ABP)
    assert record["steps"] == uninterrupted["steps"] == 8 and record["reached_at_step"] == 5
    assert record["dev"] == uninterrupted["dev"]
    np.testing.assert_array_equal(resumed_logits, logits)


@pytest.mark.parametrize("scope", ["global", "per-tensor", "per-matrix"])
def test_the_reached_sparsity_is_exact_in_every_scope(runs, scope):
    out, record, _ = runs(f"abp-{scope}", "abp", {"sparsity": 0.7, "prune_scope": scope}, **ABP)
    patch = TaskPatch.load(out / "patch.safetensors")
    sizes = {n: d.numel for n, d in patch.diffs.items()}
    switched_off = {n: d.nnz for n, d in patch.diffs.items()}
    total = sum(sizes.values())
    assert {d.kind for d in patch.diffs.values()} == {"mask"}
    if scope == "per-matrix":  # every matrix at the same sparsity, rounded on its own
        assert switched_off == {n: size - round(0.3 * size) for n, size in sizes.items()}
    else:
        assert sum(switched_off.values()) == total - round(0.3 * total)
    if scope == "per-tensor":
        assert all(abs(off - 0.7 * size) < 1 for off, size in zip(switched_off.values(), sizes.values()))
    assert record["tensor_sparsity"] == pytest.approx({n: off / sizes[n] for n, off in switched_off.items()})


def test_a_mask_patch_changes_no_weight_only_switches_entries_off(runs, tiny_model, tmp_path):
    out, record, logits = runs("abp", "abp", {"sparsity": 0.5}, **ABP)
    base = load_base(tiny_model, 2, labels=("not_equivalent", "equivalent"))
    assert record["fingerprint"] == base.fingerprint  # the base the run left behind is the pretrained one
    patch = TaskPatch.load(out / "patch.safetensors")
    assert set(patch.diffs) == set(encoder_linear_weights(base.model))
    export_model(patch, base, tmp_path / "exported")
    exported = dict(AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported").named_parameters())
    for name, pretrained in base.base_parameters().items():
        off = torch.zeros(pretrained.numel(), dtype=torch.bool)
        if name in patch.diffs:
            off[patch.diffs[name].positions] = True
        off = off.view_as(pretrained)
        assert torch.equal(exported[name][off], torch.zeros(int(off.sum())))  # zeros where switched off
        assert torch.equal(exported[name][~off], pretrained.detach()[~off])  # the pretrained weight elsewhere
    assert api.evaluate_patch(out / "patch.safetensors", data_dir=GLUE) == api.evaluate_run(out, GLUE)


def test_the_papers_push_is_a_logged_loss_term(runs):
    out, record, _ = runs("abp-loss", "abp", {"sparsity": 0.5, "push": "loss", "gamma": 1e-3}, **ABP)
    push = _log(out, "push")
    assert push and all(value > 0 for _, _, value in push)
    task, loss = _log(out, "task_loss"), _log(out, "loss")
    assert all(math.isclose(lo, ta + pu, rel_tol=1e-5) for (_, _, lo), (_, _, ta), (_, _, pu) in zip(loss, task, push))


def test_gradual_magnitude_prunes_the_smallest_pretrained_weights_in_events(runs, tiny_model):
    out, record, _ = runs("magnitude", "magnitude", {"sparsity": 0.6, "pruning_events": 3}, epochs=2)
    sparsity = [value for _, phase, value in _log(out, "sparsity") if phase == "prune"]
    assert sparsity == sorted(sparsity) and len(set(sparsity)) == 4  # 0, then the 3 events
    base = load_base(tiny_model)
    patch = TaskPatch.load(out / "patch.safetensors")
    for name, diff in patch.diffs.items():  # per matrix: each matrix's smallest |w| switched off
        magnitude = base.model.get_parameter(name).detach().abs().reshape(-1)
        off = torch.zeros_like(magnitude, dtype=torch.bool)
        off[diff.positions] = True
        assert diff.nnz == diff.numel - round(0.4 * diff.numel)
        assert magnitude[off].max() <= magnitude[~off].min()


def test_a_random_mask_is_seeded_and_not_the_magnitude_one(runs, tiny_model, tmp_path):
    out, _, _ = runs("random", "random-mask", {"sparsity": 0.6})
    again, _ = train_in_process(tmp_path, tiny_model, "random-mask", {"sparsity": 0.6})
    first, second = (TaskPatch.load(p / "patch.safetensors") for p in (out, tmp_path))
    magnitude = TaskPatch.load(runs("magnitude", "magnitude", {"sparsity": 0.6, "pruning_events": 3}, epochs=2)[0]
                               / "patch.safetensors")
    name = next(iter(first.diffs))
    assert torch.equal(first.diffs[name].positions, second.diffs[name].positions)
    assert not torch.equal(first.diffs[name].positions, magnitude.diffs[name].positions)


def test_head_only_changes_no_base_entry(runs):
    out, record, _ = runs("head", "head")
    patch = TaskPatch.load(out / "patch.safetensors")
    assert patch.diffs == {} and set(patch.head) == {"classifier.weight", "classifier.bias"}
    assert record["trainable_params"] == 32 * 2 + 2


@pytest.mark.parametrize("options,message", [
    ({"sparsity": 0.0}, r"--sparsity must be in \(0, 1\)"),
    ({"sparsity": 1.0}, r"--sparsity must be in \(0, 1\)"),
    ({"sparsity": -0.5}, r"--sparsity must be in \(0, 1\)"),
    ({"prune_scope": "per-row"}, "unknown scope 'per-row'"),
    ({"push": "pull"}, "--push must be shift or loss"),
    ({"score_init": "blind"}, "--score-init must be paper or magnitude, not 'blind'"),
    ({"head_epochs": -1.0}, "--head-epochs cannot be negative"),
])
def test_bad_abp_options_are_refused(options, message):
    with pytest.raises(DiffpruneError, match=message):
        build_method("abp", options)


def test_bad_input_is_refused_before_the_model_loads_and_writes_nothing(tmp_path, tiny_model):
    out = tmp_path / "run"
    result = run_cli("train", "--method", "abp", "--sparsity", "1.5", "--model", tiny_model, "--output", str(out))
    assert result.returncode == 1 and result.stderr.strip() == "error: --sparsity must be in (0, 1), not 1.5"
    result = run_cli("train", "--method", "magnitude", "--prune-include", "nothing.*", "--model", tiny_model,
                     "--data-dir", GLUE, "--output", str(out))
    assert result.returncode == 1 and "no base parameter matches --prune-include 'nothing.*'" in result.stderr
    assert not out.exists()


def test_a_mask_patch_is_refused_on_another_base(runs, tmp_path):
    from conftest import tiny_bert

    out, record, _ = runs("abp", "abp", {"sparsity": 0.5}, **ABP)
    other = load_base(tiny_bert(tmp_path / "other", initializer_range=0.05))
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(DiffpruneError) as error:
        TaskPatch.load(out / "patch.safetensors").apply(other)
    assert record["fingerprint"] in str(error.value) and other.fingerprint in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in other.model.state_dict().items())


def test_the_head_rate_follows_lr_where_the_head_is_what_trains(tiny_model):
    from diffprune.heads import FROZEN_ENCODER_HEAD_LR
    from diffprune.training.settings import TrainSettings

    def rates(method, **settings):
        m = build_method(method, {"sparsity": 0.5})
        base = load_base(tiny_model)
        phases = m.phases(m.prepare(base), base, TrainSettings(method=method, **settings))
        return [{g.name: g.lr for g in phase.param_groups()} for phase in phases]

    assert rates("magnitude", lr=5e-4) == [{"head": 5e-4, "head_no_decay": 5e-4}] * 2
    assert rates("magnitude", lr=5e-4, head_lr=2e-3)[1]["head"] == 2e-3
    # abp's --lr is its scores'; its head keeps the mask methods' head rate unless --head-lr says
    head = FROZEN_ENCODER_HEAD_LR
    assert rates("abp", lr=1e-3)[0] == {"scores": 1e-3, "head": head, "head_no_decay": head}
    assert rates("abp", lr=5e-4)[0]["head"] == head and rates("abp", lr=5e-4, head_lr=7e-3)[1]["head"] == 7e-3
