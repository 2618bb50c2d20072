"""The packaged all-MiniLM-L6-v2 end to end, on the few dozen GLUE rows kept under tests/."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli

pytestmark = pytest.mark.integration


def test_rte_full_three_steps_on_packaged_model(tmp_path, glue_dir):
    """The issue's smoke command: a full finetune of RTE for three steps completes."""
    out = tmp_path / "rte"
    result = run_cli("train", "--task", "RTE", "--method", "full", "--max-steps", "3", "--output", str(out),
                     "--data-dir", glue_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dev accuracy:" in result.stdout and str(out) in result.stdout
    record = json.loads((out / "run.json").read_text())
    assert record["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert record["fingerprint"].startswith("sha256:")
    assert record["steps"] == 3 and record["trainable_params"] == 22_713_986
    assert (out / "model" / "model.safetensors").exists()


def test_diff_struct_patch_on_packaged_model(tmp_path, glue_dir):
    """A real diff-struct patch at 0.5% of MiniLM: exactly k entries, small file, exact revert."""
    from diffprune.api import evaluate_patch
    from diffprune.base import load_base
    from diffprune.patch import TaskPatch, information_bound_bits

    out = tmp_path / "mrpc"
    result = run_cli("train", "--task", "MRPC", "--method", "diff-struct", "--budget", "0.005", "--max-steps", "2",
                     "--batch-size", "16", "--output", str(out), "--data-dir", glue_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a full model copy" in result.stdout and "patch written to" in result.stdout
    record = json.loads((out / "run.json").read_text())
    k = round(0.005 * 22_713_216)
    assert record["k"] == k and record["nnz"] <= k and record["nnz"] > 0.99 * k

    patch = TaskPatch.load(out / "patch.safetensors")
    bound = (information_bound_bits(22_713_216, patch.nnz) + 16 * patch.nnz) / 8
    assert patch.info()["bytes"] <= 1.1 * bound

    base = load_base(None, 2)
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    applied = patch.apply(base)
    changed = sum(int((p != before[n]).sum()) for n, p in base.model.named_parameters() if n in patch.diffs)
    assert changed > 0.99 * patch.nnz  # fp16 rounding can leave a value too small to move a weight
    applied.revert()
    assert all(torch.equal(p, before[n]) for n, p in base.model.named_parameters())

    assert evaluate_patch(out / "patch.safetensors", data_dir=glue_dir)["score"] == pytest.approx(record["score"])
