"""`diffprune patch add`: the sum of two add patches of one base."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli, tiny_bert
from diffprune.base import load_base
from diffprune.errors import DiffpruneError
from diffprune.patch import TaskPatch
from diffprune.patch.ops import add_files, sum_patches
from diffprune.serving.synthetic import random_patch


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return load_base(str(tiny_bert(tmp_path_factory.mktemp("add-bert") / "m", dropout=0.0)), 2)


def test_the_sum_adds_every_diff_and_reports_the_overlap(base):
    domain = random_patch(base, 0.2, 2, seed=1, task="domain")
    task = random_patch(base, 0.2, 3, seed=2, task="MNLI")
    total, overlaps = sum_patches(domain, task)
    for name in set(domain.diffs) | set(task.diffs):
        want = domain.dense_diff(name) + task.dense_diff(name)
        assert torch.equal(total.diffs[name].to_dense(), want), name
    both = {n: int((domain.diffs[n].to_dense() != 0).logical_and(task.diffs[n].to_dense() != 0).sum())
            for n in domain.diffs}
    assert overlaps == {n: k for n, k in both.items() if k} and sum(overlaps.values()) > 0
    assert total.head.keys() == task.head.keys() and total.meta["task"] == "MNLI"
    assert [o["task"] for o in total.meta["sum_of"]] == ["domain", "MNLI"] and total.meta["metrics"] == {}


def test_entries_that_cancel_are_left_out(base):
    a = random_patch(base, 0.1, 2, seed=3)
    b = TaskPatch({n: type(d)(d.shape, d.positions, -d.values, d.kind) for n, d in a.diffs.items()}, a.head, a.meta)
    total, _ = sum_patches(a, b)
    assert total.nnz == 0


def test_mask_patches_and_other_bases_are_refused(base, tmp_path):
    add = random_patch(base, 0.1, 2)
    with pytest.raises(DiffpruneError, match="holds 'mask' changes"):
        sum_patches(add, random_patch(base, 0.1, 2, kind="mask"))
    other = random_patch(base, 0.1, 2)
    other.meta["fingerprint"] = "sha256:another"
    with pytest.raises(DiffpruneError, match="different bases"):
        sum_patches(add, other)


def test_the_file_keeps_float16_unless_summed_entries_need_float32(base, tmp_path):
    a, b = random_patch(base, 0.1, 2, seed=4), random_patch(base, 0.1, 2, seed=5)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    done = add_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors")
    assert done["overlapping"] > 0 and done["value_dtype"] == "float32"
    with pytest.raises(DiffpruneError, match="exists"):
        add_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors")
    words = [n for n in a.diffs if "word_embeddings" in n]
    apart = random_patch(base, 0.1, 2, seed=6, tensors=words)
    rest = random_patch(base, 0.1, 2, seed=7, tensors=[n for n in a.diffs if n not in words])
    apart.save(tmp_path / "d.safetensors")
    rest.save(tmp_path / "e.safetensors")
    assert add_files(tmp_path / "d.safetensors", tmp_path / "e.safetensors", tmp_path / "f.safetensors")[
        "value_dtype"] == "float16"


def test_the_command_prints_the_overlap(base, tmp_path):
    random_patch(base, 0.1, 2, seed=8).save(tmp_path / "a.safetensors")
    random_patch(base, 0.1, 2, seed=9).save(tmp_path / "b.safetensors")
    done = run_cli("patch", "add", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                   "--output", str(tmp_path / "sum.safetensors"))
    assert done.returncode == 0, done.stderr
    assert "overlapping positions summed" in done.stdout and "overlapping in" in done.stdout
    assert TaskPatch.load(tmp_path / "sum.safetensors").nnz > 0
    refused = run_cli("patch", "add", str(tmp_path / "a.safetensors"), str(tmp_path / "nope.safetensors"),
                      "--output", str(tmp_path / "x.safetensors"))
    assert refused.returncode == 1 and refused.stderr.startswith("error:")
