"""Diff pruning methods end to end, in process, on the tiny BERT and the MRPC fixtures.

Every run is small (24 training examples, batch 8: three steps per phase), so the whole file
takes seconds. Runs that several tests read are trained once and cached for the module.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from conftest import GLUE_FIXTURES, LogitSpy, run_cli, tiny_bert, train_in_process
from diffprune import api
from diffprune.base import load_base
from diffprune.errors import DiffpruneError
from diffprune.glue import get_task, make_collator
from diffprune.methods import build_method
from diffprune.pruning.schedule import DensityController, cubic_schedule
from diffprune.pruning.topk import apportion as _apportion
from diffprune.pruning.topk import budget_count
from diffprune.patch import TaskPatch
from diffprune.patch.ops import base_for
from diffprune.training.settings import TrainSettings


GLUE = str(GLUE_FIXTURES)


DIFF_METHODS = ["diff", "diff-struct", "nonadaptive"]


PAPER_LAMBDA = 1.25e-7


# Checks of exactly k kept entries store fp32 values: with fp16 a value below 6e-8 (a key bias,
# whose gradient is rounding noise) is stored as 0, which changes nothing, and is left out.
FP32 = {"patch_dtype": "float32"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    """run(name, method, options, **settings): train once per name in this module."""
    cache: dict[str, tuple] = {}

    def get(name: str, method: str, options: dict | None = None, **settings):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            record, logits = train_in_process(out, tiny_model, method, options, **settings)
            cache[name] = (out, record, logits)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def shapes(tiny_model) -> dict[str, tuple[int, ...]]:
    base = load_base(tiny_model)
    return {n: tuple(p.shape) for n, p in base.base_parameters().items()}


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory) -> str:
    """Another tiny BERT of the same architecture with other initial weights: another fingerprint."""
    return str(tiny_bert(tmp_path_factory.mktemp("other-tiny"), initializer_range=0.05))


def _log_values(output: Path, name: str) -> list[float]:
    with open(output / "log.csv", newline="") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["name"] == name]


def _log_phases(output: Path) -> set[str]:
    with open(output / "log.csv", newline="") as f:
        return {r["phase"] for r in csv.DictReader(f)}


def _dev_with_patch(patch: TaskPatch, model: str, max_eval_samples: int | None = 16):
    """A freshly loaded base, patched: (dev metrics, dev logits, the base, its state before, the applied patch)."""
    base = base_for(patch, model)
    before = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    applied = patch.apply(base)
    spec = get_task("MRPC")
    data = api.load_task_data(spec, base, TrainSettings(task="MRPC", data_dir=GLUE, max_eval_samples=max_eval_samples),
                              with_train=False)
    with LogitSpy() as spy:
        metrics = api.dev_metrics(base.model, data, make_collator(base.tokenizer), Accelerator(), 128)
    return metrics, spy.last, base, before, applied


# -- the three diff methods --------------------------------------------------------------------
@pytest.mark.parametrize("method", DIFF_METHODS)
def test_diff_method_writes_exact_budget_patch(run, method, tiny_model):
    out, record, logits = run(f"{method}-fp32", method, {"budget": 0.01, **FP32})
    path = out / "patch.safetensors"
    assert path.is_file()
    k = budget_count(0.01, record["base_params"])
    assert record["k"] == k and record["budget"] == 0.01
    # The patch holds exactly k entries. A kept entry could only be missing if its value as
    # stored were exactly 0 (it changes nothing): a trained value of exactly 0, which happens
    # when fewer than k entries of z * w were nonzero at projection (then top-k also picks
    # zeros, and a zero in an embedding row no batch reads never moves), or, with fp16 values,
    # one below fp16's smallest step, 6e-8 (hence fp32 values here). Here far more than k
    # were nonzero, so all k values are nonzero:
    assert 0 <= record["learned_density"] <= 1
    assert record["learned_density"] * record["base_params"] > k
    assert record["nnz"] == k
    assert record["patch_bytes"] == path.stat().st_size == record["files"]["patch.safetensors"]
    assert record["trainable_params"] == k + 2 * 32 + 2  # k values + the dense head
    assert record["steps"] == 6  # three steps in each of the two phases

    patch = TaskPatch.load(path)
    assert patch.nnz == k
    assert patch.meta["method"] == method and patch.meta["fingerprint"] == record["fingerprint"]
    assert patch.meta["base_params"] == record["base_params"]

    # Applied onto a freshly loaded base, the patch gives the trained model's dev results...
    metrics, patched_logits, base, before, applied = _dev_with_patch(patch, tiny_model)
    _, head_only_logits, *_ = _dev_with_patch(TaskPatch({}, patch.head, patch.meta), tiny_model)
    assert np.abs(head_only_logits - logits).max() > 1e-4  # the sparse diff matters
    assert metrics == record["dev"]
    # (The diff itself moves the logits by ~1e-3.)
    np.testing.assert_allclose(patched_logits, logits, rtol=0, atol=1e-6)
    # ... and reverting restores every base tensor bit for bit.
    applied.revert()
    after = base.model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_controller_moves_lambda_by_default(run):
    out, record, _ = run("diff", "diff", {"budget": 0.01})
    lambdas = _log_values(out, "l0_lambda")
    assert len(lambdas) == 3 and len(set(lambdas)) == 3  # one per step (log_every 1), each different
    assert all(abs(math.log(b / a)) <= 0.1 + 1e-9 for a, b in zip(lambdas, lambdas[1:]))  # bounded steps
    assert _log_values(out, "expected_density") and _log_values(out, "l0_penalty")


def test_controller_gain_and_logit_cap(run):
    options = {"budget": 0.01, "l0_warmup": 0.0, "alpha_lr": 1.0}
    # alpha_lr 1 pushes the logits of the gates the task favours past their start at once ...
    free, _, _ = run("free", "diff-struct", options)
    assert max(_log_values(free, "gates_above_init")) > 0
    # ... and the cap holds them there.
    calm, _, _ = run("calm", "diff-struct", {**options, "controller_gain": 0.02, "alpha_max": 5.0})
    assert _log_values(calm, "gates_above_init") == [0.0] * 3
    lambdas = _log_values(calm, "l0_lambda")
    assert all(abs(math.log(b / a)) <= 0.02 + 1e-9 for a, b in zip(lambdas, lambdas[1:]))


def test_reachable_schedule_keeps_lambda_from_winding_up(run):
    # With no warm stretch the cubic schedule asks at once for far less density than the gates
    # can reach, so lambda climbs at the full rate; floored at the reachable density it barely moves.
    options = {"budget": 0.01, "l0_warmup": 0.0}
    cubic, _, _ = run("cubic-now", "diff", options)
    floored, _, _ = run("reachable-now", "diff", {**options, "schedule": "reachable"})
    climb = [math.log(v[-1] / v[0]) for v in (_log_values(cubic, "l0_lambda"), _log_values(floored, "l0_lambda"))]
    assert climb[0] == pytest.approx(0.2) and abs(climb[1]) < 0.05


def test_lookahead_steers_on_where_the_gates_are_heading(run):
    # Every step, lambda moves by the log ratio of the predicted density to the schedule that
    # many steps ahead. The gates cannot move at the first step (w is still zero, lambda too),
    # so the prediction is the density then; after that it runs ahead of it.
    lookahead = 20
    options = {"budget": 0.01, "target_density": 0.9, "l0_warmup": 0.0, "alpha_lr": 1.0,
               "controller_lookahead": lookahead}
    out, record, _ = run("lookahead", "diff-struct", options)
    heading, now = _log_values(out, "heading_density"), _log_values(out, "expected_density")[:3]
    assert heading[0] == now[0] and heading[1] < now[1] and heading[2] < now[2]
    controller = DensityController(target=0.9, start=1.0, total_steps=3, begin=0.0)
    lam = PAPER_LAMBDA
    for step, (density, logged) in enumerate(zip(heading, _log_values(out, "l0_lambda")), start=1):
        lam = controller.update(lam, density, step + lookahead)
        assert logged == pytest.approx(lam, rel=1e-6)


def test_shift_steering_puts_the_density_on_the_schedule_without_a_penalty(run):
    # No warm stretch, so every step is steered: the density must sit on the schedule after each.
    options = {"budget": 0.01, "target_density": 0.2, "l0_warmup": 0.0, "steer": "shift", **FP32}
    out, record, _ = run("shift", "diff-struct", options)
    controller = DensityController(target=0.2, start=1.0, total_steps=3, begin=0.0)
    densities = _log_values(out, "expected_density")[:3]
    assert densities == pytest.approx([controller.scheduled(step) for step in (1, 2, 3)], rel=2e-3)
    assert all(shift > 0 for shift in _log_values(out, "logit_shift"))
    assert _log_values(out, "l0_penalty") == [] and set(_log_values(out, "l0_lambda")) == {0.0}
    assert record["nnz"] == record["k"]
    with pytest.raises(DiffpruneError, match="--steer shift uses no penalty"):
        build_method("diff", {"steer": "shift", "l0_lambda": PAPER_LAMBDA})


def test_gradual_nonadaptive_prunes_the_diff_on_the_schedule(run):
    # Six finetuning steps (two epochs of three); the density falls after step 1.5 (begin 0.25)
    # to the budget by step 4.5 (reach 0.75) and stays there, then the fixed-mask phase trains it.
    # Before the first cut it is below 1: only the embedding rows a batch has read have moved.
    options = {"budget": 0.01, "prune": "gradual"}
    out, record, _ = run("gradual", "nonadaptive", options, epochs=2)
    densities = _log_values(out, "density")
    k, total = record["k"], record["base_params"]
    scheduled = [max(k, round(cubic_schedule(step, 6, 1.0, k / total, 0.25, 0.75) * total)) / total
                 for step in range(1, 7)]
    assert len(densities) == 6 and all(d <= s for d, s in zip(densities, scheduled))
    assert densities[0] > 2 * k / total and densities[4:] == [k / total] * 2
    assert record["nnz"] == k and record["learned_density"] == pytest.approx(k / total, abs=1 / total)
    assert _log_phases(out) == {"finetune", "fixed-mask"}
    with pytest.raises(DiffpruneError, match="--prune-begin < --prune-reach"):
        build_method("nonadaptive", {"prune": "gradual", "prune_begin": 0.8, "prune_reach": 0.5})


def test_fixed_lambda_turns_the_controller_off(run):
    out, record, _ = run("fixed-lambda", "diff-struct", {"budget": 0.01, "l0_lambda": PAPER_LAMBDA})
    lambdas = _log_values(out, "l0_lambda")
    assert lambdas == [PAPER_LAMBDA] * 3
    assert record["nnz"] == record["k"] == budget_count(0.01, record["base_params"])
    assert (out / "patch.safetensors").is_file()


def test_budget_as_a_count(run):
    out, record, _ = run("count", "diff", {"budget": 500})
    assert record["k"] == 500 and record["nnz"] == 500
    assert TaskPatch.load(out / "patch.safetensors").nnz == 500


def test_budget_scope_per_tensor(run, shapes):
    out, record, _ = run("per-tensor", "diff", {"budget": 0.01, "budget_scope": "per-tensor", **FP32})
    k = budget_count(0.01, record["base_params"])
    assert record["nnz"] == k
    patch = TaskPatch.load(out / "patch.safetensors")
    assert patch.nnz == k
    numels = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(numels.values())
    quotas = dict(zip(numels, _apportion(list(numels.values()), k)))
    for name, numel in numels.items():
        held = patch.diffs[name].nnz if name in patch.diffs else 0
        assert abs(held - k * numel / total) <= 1, name  # its proportional share, rounded
        assert held == quotas[name], name


def test_diff_exclude_embeddings(run):
    out, record, _ = run("exclude", "diff-struct", {"budget": 0.01, "diff_exclude": "*embeddings*"})
    patch = TaskPatch.load(out / "patch.safetensors")
    assert patch.diffs and not any("embeddings" in n for n in patch.diffs)
    assert record["nnz"] == record["k"] == budget_count(0.01, record["base_params"]) == patch.nnz
    assert set(patch.head) == {"classifier.weight", "classifier.bias"}
    # The tensors left out stay frozen: they are not trainable parameters of the task.
    assert record["trainable_params"] == record["k"] + 2 * 32 + 2


@pytest.mark.parametrize("options", [{"diff_exclude": "*embeddings*"}, {"diff_include": "*.bias"}])
def test_tensors_left_out_of_the_diff_stay_frozen(tiny_model, options):
    base = load_base(tiny_model)
    method = build_method("diff", {"budget": 0.01, **options})
    model = method.prepare(base)
    trainable = {n for n, p in base.model.named_parameters() if p.requires_grad}
    assert trainable == set(base.head_names)  # no base tensor trains directly, diffed or not
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 102]]), "labels": torch.tensor([1])}
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is None for n, p in base.model.named_parameters() if n not in base.head_names)
    assert all(p.grad is not None for n, p in base.model.named_parameters() if n in base.head_names)
    assert method.trainable_params(model) == method.k + 2 * 32 + 2


def test_diff_include_biases_only(run, shapes):
    out, record, _ = run("include", "diff", {"budget": 0.01, "diff_include": "*.bias", **FP32})
    patch = TaskPatch.load(out / "patch.safetensors")
    assert patch.diffs and all(n.endswith(".bias") for n in patch.diffs)
    biases = sum(math.prod(s) for n, s in shapes.items() if n.endswith(".bias"))
    assert biases < budget_count(0.01, record["base_params"])  # the budget is capped at what can be diffed
    assert record["k"] == biases and record["nnz"] == biases == patch.nnz
    assert record["trainable_params"] == biases + 2 * 32 + 2


def test_fixed_epochs_zero_still_projects(run):
    options = {"budget": 300, "fixed_epochs": 0, "fixed_init": "w", "projection": "deterministic"}
    out, record, _ = run("no-fixed", "diff", options)
    assert record["steps"] == 3  # the L0 phase only
    assert _log_phases(out) == {"l0"}
    assert record["k"] == record["nnz"] == 300
    assert TaskPatch.load(out / "patch.safetensors").nnz == 300
    assert 0 <= record["learned_density"] <= 1


def test_unknown_diff_option_values_are_refused(tmp_path, tiny_model):
    with pytest.raises(DiffpruneError, match="--budget-scope"):
        build_method("diff", {"budget_scope": "layer"})
    with pytest.raises(DiffpruneError, match="--projection"):
        build_method("diff", {"projection": "mean"})
    with pytest.raises(DiffpruneError, match="--alpha-max"):
        build_method("diff", {"alpha_max": 4.0})
    with pytest.raises(DiffpruneError, match="--controller-gain"):
        build_method("diff", {"controller_gain": 0.0})
    with pytest.raises(DiffpruneError, match="--controller-lookahead"):
        build_method("diff", {"controller_lookahead": -1})
    with pytest.raises(DiffpruneError, match="--fixed-lr"):
        build_method("diff", {"fixed_lr": -1e-3})
    with pytest.raises(DiffpruneError, match="--gate-l.*l < 0 < 1 < r"):
        build_method("diff", {"gate_l": 0.5})
    for name in ("budget", "alpha_init", "l0_lambda", "controller_gain", "fixed_lr"):
        for value in (math.nan, math.inf):  # NaN passes every `x <= 0` check, so it is refused by kind
            with pytest.raises(DiffpruneError, match=f"'{name}' must be a finite number"):
                build_method("diff", {name: value})
    with pytest.raises(DiffpruneError, match="--l0-lambda cannot be negative"):
        build_method("diff-struct", {"l0_lambda": -1e-7})
    # non-adaptive diff pruning learns no gates: their options are refused, not silently ignored
    with pytest.raises(DiffpruneError, match="alpha_lr do not apply to method 'nonadaptive'"):
        build_method("nonadaptive", {"alpha_lr": 0.5})
    assert build_method("nonadaptive", {"fixed_lr": 1e-3, "budget": 0.01}).config.budget == 0.01
    with pytest.raises(DiffpruneError, match="'budget' must be float"):
        build_method("diff", {"budget": "0.5%"})
    with pytest.raises(DiffpruneError, match="no base parameter matches"):
        build_method("diff", {"diff_include": "nothing*"}).prepare(load_base(tiny_model))


@pytest.mark.parametrize("method", ["diff-struct", "shira"])
def test_a_non_positive_budget_is_refused_before_the_model_loads(method, tmp_path):
    for budget in (0.0, -0.01):
        with pytest.raises(DiffpruneError, match="--budget must be positive"):
            build_method(method, {"budget": budget})
    # the budget is checked first: the model folder named here does not exist, and is never looked at
    result = run_cli("train", "--method", method, "--budget", "0", "--model", str(tmp_path / "absent"),
                     "--output", str(tmp_path / "run"))
    assert result.returncode == 1 and "--budget must be positive" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("budget, factor", [(0.01, 5), (0.005, 5), (0.0025, 10), (0.001, 15), (0.0002, 15)])
def test_fixed_mask_rate_rises_as_the_budget_shrinks(tiny_model, budget, factor):
    base = load_base(tiny_model)
    method = build_method("diff", {"budget": budget})
    model = method.prepare(base)
    settings = TrainSettings(task="MRPC", method="diff", model=tiny_model, lr=1e-4)
    groups = {g.name: g.lr for g in method._fixed_phase(model, base, settings).param_groups()}
    assert groups["values"] == pytest.approx(factor * 1e-4, rel=1e-12)
    assert groups["head"] == groups["values"]  # the head follows unless --head-lr is given
    method = build_method("diff", {"budget": budget, "fixed_lr": 2e-3})
    model = method.prepare(base)
    assert method._fixed_phase(model, base, settings).param_groups()[0].lr == 2e-3
    count = round(budget * base.num_base_params)  # a budget given as a count is the same fraction
    method = build_method("diff", {"budget": count})
    model = method.prepare(base)
    rate = method._fixed_phase(model, base, settings).param_groups()[0].lr
    assert rate == pytest.approx(factor * 1e-4, rel=0.01)


# -- SHiRA, trained (its entries and rank: test_diff_projection.py) ------------------------------
def test_shira_record(run):
    out, record, _ = run("shira", "shira", {"budget": 0.01})
    # Per layer: query, key, value, attention output (32 x 32: m + n = 64), intermediate and output
    # (32 x 64: 96); two layers and the pooler (64): 2 * (4 * 64 + 2 * 96) + 64 = 960 per unit of r.
    # k = round(0.01 * 1_000_096) = 10_001, r = round(10_001 / 960) = 10.
    assert record["shira_r"] == 10 and record["nnz"] == 10 * 960
    assert (out / "patch.safetensors").is_file()  # stored as an add patch (tests/test_contract.py)


# -- a patch only fits its own base -------------------------------------------------------------
def test_patch_refused_on_another_base(run, other_tiny, tiny_model):
    out, record, _ = run("diff", "diff", {"budget": 0.01})
    patch = TaskPatch.load(out / "patch.safetensors")
    other = load_base(other_tiny)
    assert other.fingerprint != record["fingerprint"]
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(DiffpruneError) as error:
        patch.apply(other)
    message = str(error.value)
    assert record["fingerprint"] in message and other.fingerprint in message and "\n" not in message
    assert all(torch.equal(v, before[k]) for k, v in other.model.state_dict().items())


def test_eval_of_a_patch_takes_a_split(run):
    out, record, _ = run("diff", "diff", {"budget": 0.01})
    patch = out / "patch.safetensors"
    assert TaskPatch.load(patch).meta["max_seq_length"] == record["settings"]["max_seq_length"]
    assert api.evaluate_patch(patch, data_dir=GLUE, split="dev").keys() == record["dev"].keys()
    assert api.evaluate_patch(patch, data_dir=GLUE, split="validation") == api.evaluate_patch(patch, data_dir=GLUE)
    with pytest.raises(DiffpruneError, match="no split 'matched'"):
        api.evaluate_patch(patch, data_dir=GLUE, split="matched")
    with pytest.raises(DiffpruneError, match="no dev split 'test'"):
        api.evaluate_patch(patch, data_dir=GLUE, split="test")
