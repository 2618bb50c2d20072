"""The benchmark scripts: every planned run is a valid configuration, and the goal checks read
the records the way the issue states them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import GLUE_FIXTURES, run_cli

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import run_glue  # noqa: E402
import study  # noqa: E402
import table  # noqa: E402


@pytest.mark.parametrize("config", [config for profile in run_glue.PROFILES.values() for config in run_glue.planned(
    ["MRPC", "STS-B"], [m for m, _, _ in run_glue.VARIANTS], 2, profile)], ids=run_glue.run_name)
def test_planned_runs_are_valid_settings(config):
    """A config the benchmark would pass to `diffprune train --config` is accepted as it is
    (a run that fails on its settings costs a queue slot, found only when it starts)."""
    from diffprune.cli import split_settings
    from diffprune.methods import build_method

    settings, options = split_settings(run_glue.train_config(config))
    build_method(settings.method, options)


def test_stopping_the_plan_stops_its_training_process(tmp_path):
    """A `kill` of run_glue.py must not leave its training process running on its own."""
    child_pid = tmp_path / "child.pid"
    child = f"import os, time; open({str(child_pid)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    script = f"import run_glue, sys; run_glue.run_child([sys.executable, '-c', {child!r}])"
    plan = subprocess.Popen([sys.executable, "-c", script], cwd=Path(run_glue.__file__).parent)
    deadline = time.monotonic() + 30
    while not (child_pid.exists() and child_pid.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(child_pid.read_text())
    plan.send_signal(signal.SIGTERM)
    assert plan.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped by subprocess.run


def run(task, method, score, budget=None, lora_r=None, artifact_bytes=1000):
    settings = {"lora_r": lora_r} if lora_r else {}
    return {"task": task, "method": method, "budget": budget, "score": score, "settings": settings,
            "artifact_bytes": artifact_bytes}


def goal_rows(records):
    rows = table.render_goals(records).splitlines()[2:]
    return {row.split(" | ")[0].lstrip("| "): row for row in rows}


def test_goals_compare_common_tasks_with_median_over_seeds():
    records = [run("RTE", "full", 0.60), run("RTE", "full", 0.58), run("MRPC", "full", 0.85),
               run("STS-B", "full", 0.86),  # not measured for the patch: left out of both averages
               run("RTE", "diff-struct", 0.57, 0.005), run("MRPC", "diff-struct", 0.86, 0.005),
               run("RTE", "diff-struct", 0.50, 0.001), run("MRPC", "diff-struct", 0.80, 0.001)]
    rows = goal_rows(records)
    within = rows["diff-struct @0.005: within 1.0 point of full finetuning"]
    # patch (57 + 86) / 2 = 71.5 against full (59 + 85) / 2 = 72.0: -0.5 is within 1.0
    assert "RTE 1/2, MRPC 1/1" in within and "| 71.5 | 72.0 | -0.5 | yes |" in within
    assert rows["diff-struct @0.001: within 1.5 points of full finetuning"].endswith("| no |")
    assert "not measured yet" in rows["diff-struct @0.005: above SHiRA with about as many changed entries"]


def test_lora_goal_only_counts_adapters_at_least_as_large_as_the_patch():
    records = [run("MRPC", "diff-struct", 0.86, 0.005, artifact_bytes=500),
               run("MRPC", "lora", 0.90, lora_r=8, artifact_bytes=300),
               run("MRPC", "lora", 0.84, lora_r=16, artifact_bytes=600)]
    rows = goal_rows(records)
    assert not any("LoRA r8" in name for name in rows)
    assert rows["diff-struct @0.005: above LoRA r16 (adapter ≥ the 500 B patch)"].endswith("| +2.0 | yes |")


def test_a_variant_at_another_rate_or_length_is_named_and_planned_apart():
    plan = {run_glue.run_name(c): c for c in run_glue.planned(["MRPC", "STS-B"], ["distil"], 1,
                                                               run_glue.PROFILES["fast"])}
    assert plan["STS-B-distil-sp0.95-s1"]["epochs"] == 3 and "lr" not in plan["STS-B-distil-sp0.95-s1"]
    long = plan["STS-B-distil-sp0.95-lr3e-05-x4-epochs-s1"]
    assert long["epochs"] == 12 and long["lr"] == 3e-5 and "epochs_factor" not in run_glue.train_config(long)
    assert "MRPC-distil-sp0.95-lr0.0001-reg-teacher-s1" not in plan  # the rate study runs on STS-B only
    assert "STS-B-distil-sp0.95-lr0.0001-reg-teacher-s1" in plan
    assert run_glue.variant_tags({"method": "full", "lr": 5e-5}) == []  # the method's default rate: no tag


def test_distil_goals_need_two_points_over_magnitude_pruning():
    records = [run("STS-B", "full", 0.84), {**run("STS-B", "distil", 0.80), "sparsity": 0.95},
               {**run("STS-B", "distil", 0.785), "sparsity": 0.95, "variant": "gmp lr3e-05"},
               {**run("STS-B", "distil", 0.79), "sparsity": 0.0, "variant": "L1"}]
    rows = goal_rows(records)
    assert rows["distil s0.95: within 1.5 points of the teacher (full finetuning)"].endswith("| -4.0 | no |")
    assert rows["distil s0.95: at least 2.0 points above gradual magnitude pruning (at a finetuning rate, 3e-5)"
                ].endswith("| +1.5 | no |")
    assert rows["distil s0.95: above the 1-layer dense student (17% of the weights)"].endswith("| +1.0 | yes |")


def test_full_finetuning_floors_use_the_median_over_seeds():
    records = [run("RTE", "full", 0.60), run("RTE", "full", 0.52), run("MRPC", "full", 0.849)]
    rows = goal_rows(records)
    assert rows["full: RTE at least 55 (the foundation's floor)"].endswith("| 56.0 | 55.0 | +1.0 | yes |")
    assert rows["full: MRPC at least 85 (the foundation's floor)"].endswith("| no |")
    assert "not measured yet" in rows["full: SST-2 at least 87 (the foundation's floor)"]


def test_a_branch_from_the_l0_phase_is_the_whole_run(tiny_model, tmp_path):
    """study.py --from-l0: an L0-only run, copied and resumed with another fixed-mask learning
    rate, ends with the patch of a whole run made with that rate (the projection's gate sample
    included, since the checkpoint holds the RNG)."""
    common = {"task": "MRPC", "method": "diff-struct", "model": tiny_model, "seed": 3, "epochs": 2,
              "batch_size": 8, "max_seq_length": 64, "max_eval_samples": 8, "budget": 0.01,
              "patch_dtype": "float32"}
    configs = {"l0": {**common, "fixed_epochs": 0}, "branch": {**common, "fixed_lr": 0.003}}
    configs["whole"] = configs["branch"]

    def train(name, *extra):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(configs[name]))
        done = run_cli("train", "--config", str(path), "--output", str(tmp_path / name), "--data-dir",
                       str(GLUE_FIXTURES), *extra, OMP_NUM_THREADS="1")
        assert done.returncode == 0, done.stderr[-3000:]

    train("l0")
    study.branch_from_l0(tmp_path / "l0", tmp_path / "branch", configs["branch"])
    assert not (tmp_path / "branch" / "patch.safetensors").exists()
    train("branch", "--resume")
    train("whole")
    branch, whole = (load_file(tmp_path / name / "patch.safetensors") for name in ("branch", "whole"))
    assert branch.keys() == whole.keys()
    assert all(torch.equal(branch[k], whole[k]) for k in branch)
    evals = [json.loads((tmp_path / name / "run.json").read_text())["evals"] for name in ("branch", "whole")]
    assert [e["phase"] for e in evals[0]] == ["l0", "l0", "fixed-mask", "fixed-mask"]
    assert [e["score"] for e in evals[0]] == [e["score"] for e in evals[1]]

    with pytest.raises(SystemExit, match="other settings"):  # the L0 phase itself must match
        study.branch_from_l0(tmp_path / "l0", tmp_path / "other", {**configs["branch"], "alpha_lr": 0.2})


def test_the_head_probe_trains_every_head_and_tabulates_it(tiny_model):
    """head_probe.py: each head learns a linear STS-B-like target from cached features, and the
    table has a row per head with a cell per rate."""
    import head_probe
    from transformers import AutoConfig

    from diffprune.glue import get_task

    config = AutoConfig.from_pretrained(tiny_model, num_labels=1)
    torch.manual_seed(0)
    layers, n, width = config.num_hidden_layers + 1, 256, config.hidden_size

    def split(count):
        mean = torch.randn(layers, count, width)
        labels = 2.5 + mean[-1, :, 0] + 0.1 * torch.randn(count)  # readable from the token mean
        return {"cls": torch.randn(layers, count, width), "mean": mean, "pooler": mean[-1], "labels": labels}

    train, dev = split(n), split(128)
    spec = get_task("STS-B")
    scores = {head: head_probe.train_head(head, 1e-2, config, train, dev, spec, 30, 1)
              for head in ("model", "mean-mix")}
    assert scores["mean-mix"] > 0.5 and scores["model"] > 0.5  # both see the signal (the pooler is its mean here)
    assert head_probe.train_head("cls-mix", 1e-2, config, train, dev, spec, 30, 1) < 0.5  # [CLS] holds noise
    records = [{"task": "STS-B", "train_examples": n, "epochs": 4.0, "head": h, "lr": 1e-2, "score": s}
               for h, s in scores.items()]
    table_text = head_probe.render(records)
    assert "| STS-B | 256 | 4 | model | " in table_text and "| mean-mix |" in table_text


def test_the_mask_probe_scores_masks_from_the_task_gradient(tiny_model):
    """mask_probe.py: the task gradient reaches every encoder Linear weight through a mean-mix
    head, each scorer ranks as its formula says, and the table has a row per scorer."""
    import mask_probe
    from transformers import AutoConfig

    from diffprune.base import load_base
    from diffprune.heads import POOLINGS, LayerMixHead
    from diffprune.pruning.targets import encoder_linear_weights

    base = load_base(tiny_model, 1, regression=True)
    config = AutoConfig.from_pretrained(tiny_model, num_labels=1)
    head = LayerMixHead(config, POOLINGS["mean-mix"])
    tokens = base.tokenizer(["a man plays a guitar", "the cat sleeps"] * 4, ["a man plays music", "a dog runs"] * 4)
    examples = [{"input_ids": i, "attention_mask": m, "token_type_ids": t, "labels": float(n % 5)}
                for n, (i, m, t) in enumerate(zip(tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"]))]
    names = encoder_linear_weights(base.model)
    grads = mask_probe.task_gradient(base, examples, head, names, 8, regression=True)
    assert len(grads) == len(names) and all(g.abs().sum() > 0 for g in grads)
    assert all(not base.model.get_parameter(n).requires_grad for n in names)  # the base stays frozen
    weights = [torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 3.0]])]
    g = [torch.tensor([[2.0, 1.0]]), torch.tensor([[-1.0, 0.1]])]
    assert torch.equal(mask_probe.mask_scores("taylor", weights, g, 0)[0], torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(mask_probe.mask_scores("movement", weights, g, 0)[1], torch.tensor([[0.5, -0.3]]))
    assert torch.equal(mask_probe.mask_scores("magnitude", weights, g, 0)[0], torch.tensor([[1.0, 2.0]]))
    records = [{"task": "STS-B", "train_examples": 8, "grad_examples": 8, "scorer": s, "sparsity": 0.5, "score": 0.1}
               for s in mask_probe.SCORERS]
    assert "| STS-B | 8 / 8 | taylor | 10.0 |" in mask_probe.render(records)
