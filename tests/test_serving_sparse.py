"""Pruning patches served on their own sparse models (TaskBank(sparse_runtime=True)): the same
predictions as switching, the base untouched, the base's tensors shared, the memory counted."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_bert
from diffprune.base import load_base
from diffprune.patch import TaskPatch
from diffprune.pruning.targets import encoder_linear_weights
from diffprune.serving import Engine, Request, TaskBank
from diffprune.serving.synthetic import random_patch
from diffprune.sparse import SparseLinear

TEXTS = ["hello world", ("a pair of", "sentences here"), "another longer sentence with more words in it"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(tiny_bert(tmp_path_factory.mktemp("sparse-serving") / "m", dropout=0.0))


@pytest.fixture(scope="module")
def base(model_dir):
    return load_base(model_dir, 2)


@pytest.fixture
def folder(tmp_path, base):
    weights = encoder_linear_weights(base.model)
    random_patch(base, 0.1, 3, seed=1, kind="sparse", tensors=weights, task="sparse").save(tmp_path / "sp.safetensors")
    random_patch(base, 0.5, 2, seed=2, kind="mask", tensors=weights[:3], task="mask").save(tmp_path / "ma.safetensors")
    random_patch(base, 0.05, 1, seed=3, regression=True, task="add").save(tmp_path / "add.safetensors")
    norms = [n for n in base.base_names if "LayerNorm.weight" in n]
    random_patch(base, 0.5, 2, seed=4, kind="mask", tensors=norms, task="norms").save(tmp_path / "no.safetensors")
    # a distilled student's form: pruned matrices, and added changes to the dense tensors
    pruned = random_patch(base, 0.1, 2, seed=5, kind="sparse", tensors=weights, task="distil")
    added = random_patch(base, 0.05, 2, seed=6, tensors=[n for n in base.base_names if n not in weights])
    TaskPatch({**pruned.diffs, **added.diffs}, pruned.head, pruned.meta).save(tmp_path / "dl.safetensors")
    return tmp_path


def predictions(bank: TaskBank) -> tuple[Engine, list]:
    engine = Engine(bank)
    return engine, engine.run([Request(name, TEXTS) for name in ("sp", "ma", "add", "no", "dl")])


def test_a_pruning_patch_runs_on_its_own_sparse_model_as_it_runs_switched(folder, base):
    before = {n: t.clone() for n, t in base.model.state_dict().items()}
    _, switched = predictions(TaskBank(base, folder))
    engine, sparse = predictions(bank := TaskBank(base, folder, sparse_runtime=True))
    assert engine.sparse_batches == 3 and engine.switches == 2  # "add" alone switches, as "no" (norms only)
    for ours, theirs in zip(sparse, switched):
        for a, b in zip(ours, theirs):
            got, want = (a["value"], b["value"]) if "value" in a else (list(a["scores"].values()),
                                                                     list(b["scores"].values()))
            assert got == pytest.approx(want, abs=1e-5)
    assert {bank.describe(n)["served_by"] for n in ("sp", "ma", "dl")} == {"the sparse runtime"}
    assert bank.get("no").sparse_problem == "it prunes no Linear weight"
    assert bank.get("add").sparse_problem is not None  # mixable: never on a sparse model of its own
    assert all(torch.equal(t, before[n]) for n, t in base.model.state_dict().items())


def test_the_sparse_model_shares_what_the_patch_leaves_alone_and_counts_the_rest(folder, base):
    bank = TaskBank(base, folder, sparse_runtime=True)
    task = bank.get("sp")
    unloaded = bank.task_bytes(task)
    model = task.sparse_model(base).model
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == len(encoder_linear_weights(base.model))  # at 90% every pruned Linear is sparse here
    ours, theirs = dict(model.named_parameters()), dict(base.model.named_parameters())
    shared = [n for n in ours if n in theirs and ours[n] is theirs[n]]
    assert "bert.embeddings.word_embeddings.weight" in shared and "classifier.weight" in shared
    changed = set(TaskPatch.load(folder / "sp.safetensors").diffs)
    assert all(ours[n] is theirs[n] for n in ours if n not in changed)
    kept = sum(m.weight_bytes() for m in sparse)
    heads = sum(t.nbytes for t in task.head.values())
    assert bank.task_bytes(task) == kept + heads < unloaded  # the patch's changes are dropped once built
    assert kept < 0.25 * sum(theirs[n].nbytes for n in encoder_linear_weights(base.model))


def test_serve_sparse_runs_the_pruned_tasks_on_their_sparse_models(folder, model_dir):
    from fastapi.testclient import TestClient

    from diffprune.serving.cli import build_server

    app, bank = build_server(str(folder), model_dir, None, 64, 8, 200, 1.0, 16, True, True)
    with TestClient(app) as client:
        answer = client.post("/tasks/sp/predict", json={"inputs": ["a text", ["a pair", "of texts"]]})
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2
        assert client.get("/tasks/sp").json()["served_by"] == "the sparse runtime"
        assert 'diffprune_forwards{how="sparse"} 1.0' in client.get("/metrics").text


def test_the_memory_bound_counts_a_sparse_model_once_it_is_made(folder, base, monkeypatch):
    import diffprune.serving.bank as bank_module

    made = bank_module.sparse_task_model  # the real model, said to hold 1 GB: more than the bound leaves
    monkeypatch.setattr(bank_module, "sparse_task_model", lambda b, p: (made(b, p)[0], 2**30))
    bank = TaskBank(base, folder, sparse_runtime=True)
    engine = Engine(bank)
    engine.run([Request("add", TEXTS)])
    bank.get("ma")  # loaded, its sparse model not made yet
    bank.memory_bytes = bank.loaded_bytes()  # room for both as they are
    assert bank.loaded_names() == ["add", "ma"]
    engine.run([Request("ma", TEXTS)])
    assert bank.loaded_names() == ["ma"]  # made, counted: the other task left


def test_a_students_changed_dense_tensors_are_its_own(folder, base):
    bank = TaskBank(base, folder, sparse_runtime=True)
    model = bank.sparse_model(bank.get("dl")).model
    ours, theirs = dict(model.named_parameters()), dict(base.model.named_parameters())
    emb = "bert.embeddings.word_embeddings.weight"
    added = TaskPatch.load(folder / "dl.safetensors").dense_diff(emb)
    assert ours[emb] is not theirs[emb] and torch.equal(ours[emb], theirs[emb] + added)
