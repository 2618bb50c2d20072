"""The task bank, switching and mixed-task batches on a tiny BERT, with patches built directly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import tiny_bert
from diffprune.base import load_base
from diffprune.errors import DiffpruneError
from diffprune.patch import TaskPatch
from diffprune.patch.apply import apply_patch
from diffprune.patch.compact import CompactDiffs, CompactPatch
from diffprune.patch.model_state import state_of
from diffprune.patch.kinds import SparseDiff
from diffprune.serving import Engine, Request, TaskBank, UnknownTask
from diffprune.serving.synthetic import random_patch

TEXTS = ["hello world", ("a pair of", "sentences here"), "another longer sentence with more words in it", "x"]
# (outputs, regression) of the tasks: two and three classes, a regression, two classes again
SHAPES = [(2, False), (3, False), (1, True), (2, False)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("serving-bert") / "m", dropout=0.0)


@pytest.fixture(scope="module")
def base(model_dir):
    return load_base(str(model_dir), 2)


@pytest.fixture
def folder(tmp_path, base):
    for i, (n, regression) in enumerate(SHAPES):
        random_patch(base, 0.05, n, seed=i, regression=regression, task=f"t{i}", scale=0.2).save(
            tmp_path / f"t{i}.safetensors", "float32")
    random_patch(base, 0.05, 2, seed=9, kind="mask", task="m").save(tmp_path / "m.safetensors")
    return tmp_path


def per_task_logits(model_dir, patch: TaskPatch, inputs) -> torch.Tensor:
    """The reference: a base loaded with the task's own head shape, the patch applied whole,
    every input run alone (so padding differs from the batch's; the results must not)."""
    regression = patch.meta["problem_type"] == "regression"
    own = load_base(str(model_dir), patch.meta["num_labels"], regression=regression, head=patch.meta["head"])
    own.model.eval()
    rows = []
    with torch.no_grad(), patch.apply(own):
        for item in inputs:
            first, second = (item, None) if isinstance(item, str) else item
            rows.append(own.model(**own.tokenizer(first, second, return_tensors="pt")).logits[0])
    logits = torch.stack(rows)
    return logits if regression else logits - logits.mean(dim=1, keepdim=True)


def logits_of(predictions: list[dict]) -> torch.Tensor:
    """Back from scores to logits up to a shift per row (softmax), or the regression values."""
    if "value" in predictions[0]:
        return torch.tensor([[p["value"]] for p in predictions])
    scores = torch.tensor([list(p["scores"].values()) for p in predictions]).log()
    return scores - scores.mean(dim=1, keepdim=True)


def test_a_mixed_batch_equals_every_task_run_alone(folder, base, model_dir):
    engine = Engine(TaskBank(base, folder))
    requests = [Request(f"t{i}", TEXTS[: i + 1]) for i in range(4)] + [Request("m", TEXTS)]
    mixed = engine.run(requests)
    assert engine.mixed_batches == 1 and engine.switches == 1  # the mask patch is switched
    for request, got in zip(requests, mixed):
        patch = TaskPatch.load(folder / f"{request.task}.safetensors")
        want = per_task_logits(model_dir, patch, request.inputs)
        assert torch.allclose(logits_of(got), want, atol=1e-5), request.task


def test_tasks_with_a_mix_of_every_layer_as_head_join_the_batch(tmp_path, base, model_dir):
    """adapting-by-pruning's head (diffprune.heads): every layer's [CLS] or token mean into an
    MLP, beside tasks with the model's own head, in one mixed batch and switched."""
    kinds = {"cls": ("cls-mix", 3, False), "mean": ("mean-mix", 1, True), "own": ("model", 2, False)}
    for i, (task, (head, n, regression)) in enumerate(kinds.items()):
        random_patch(base, 0.05, n, seed=i, task=task, head=head, regression=regression, scale=0.2).save(
            tmp_path / f"{task}.safetensors", "float32")
    engine = Engine(TaskBank(base, tmp_path))
    requests = [Request(t, TEXTS) for t in kinds]
    for got in (engine.run(requests), [engine.run([r])[0] for r in requests]):
        for request, predictions in zip(requests, got):
            patch = TaskPatch.load(tmp_path / f"{request.task}.safetensors")
            want = per_task_logits(model_dir, patch, TEXTS)
            assert torch.allclose(logits_of(predictions), want, atol=1e-5), request.task
    assert engine.mixed_batches == 1 and engine.switches == 3


def test_the_deltas_matter(folder, base):
    """A mixed batch differs from the bare base: the deltas are really added."""
    engine = Engine(TaskBank(base, folder))
    patched = engine.run([Request("t0", TEXTS), Request("t3", TEXTS)])
    bare = TaskPatch.load(folder / "t0.safetensors")
    bare.diffs.clear()
    bare.save(folder / "bare.safetensors", "float32")
    engine.bank.rescan()
    plain = engine.run([Request("bare", TEXTS), Request("t3", TEXTS)])
    assert (logits_of(patched[0]) - logits_of(plain[0])).abs().max() > 1e-3


def test_every_kind_of_module_joins_a_mixed_batch(tmp_path, base, model_dir):
    """Embeddings (word, position, token type), Linear weights and biases, LayerNorms and the
    pooler, each in a task of its own, mixed with one another."""
    groups = {"emb": "embeddings.", "lin": "attention.self.query", "bias": ".bias", "norm": "LayerNorm",
              "pool": "pooler."}
    names = list(base.base_parameters())
    for i, (task, part) in enumerate(groups.items()):
        chosen = [n for n in names if part in n]
        random_patch(base, 0.3, 2, seed=i, task=task, tensors=chosen, scale=0.5).save(
            tmp_path / f"{task}.safetensors", "float32")
    engine = Engine(TaskBank(base, tmp_path))
    got = engine.run([Request(t, TEXTS) for t in groups])
    assert engine.mixed_batches == 1
    for task, predictions in zip(groups, got):
        patch = TaskPatch.load(tmp_path / f"{task}.safetensors")
        assert torch.allclose(logits_of(predictions), per_task_logits(model_dir, patch, TEXTS), atol=1e-5), task


def test_float16_patches_with_an_empty_change_mix_as_they_run_alone(tmp_path, base, model_dir):
    """Values as the file stores them (float16, read through the kernels' table) and a change
    with no entries (the word embeddings here): a mixed batch still equals each task alone."""
    for i in range(3):
        patch = random_patch(base, 0.05, 2 + i % 2, seed=20 + i, task=f"h{i}", scale=0.2)
        first = next(iter(patch.diffs))
        patch.diffs[first] = SparseDiff(patch.diffs[first].shape, torch.zeros(0, dtype=torch.int64), torch.zeros(0))
        patch.save(tmp_path / f"h{i}.safetensors")
    engine = Engine(TaskBank(base, tmp_path))
    requests = [Request(f"h{i}", TEXTS) for i in range(3)]
    got = engine.run(requests)
    assert engine.mixed_batches == 1 and engine.bank.get("h0").diffs.value_dtype == torch.float16
    for request, predictions in zip(requests, got):
        patch = TaskPatch.load(tmp_path / f"{request.task}.safetensors")
        assert torch.allclose(logits_of(predictions), per_task_logits(model_dir, patch, TEXTS), atol=1e-5)


def test_a_compact_form_an_embedding_cannot_be_looked_up_in_is_refused(base):
    from diffprune.serving.mixed import MixedBatch

    patch = random_patch(base, 0.05, 2, tensors=["bert.embeddings.word_embeddings.weight"])
    bare = CompactDiffs.of(patch.diffs)  # built without checkpoints for the embedding
    with pytest.raises(DiffpruneError, match="keeps no checkpoints for 'bert.embeddings.word_embeddings.weight'"):
        MixedBatch(base.model, [bare, bare], torch.tensor([0, 1]))


def test_moving_the_base_to_huge_pages_keeps_every_parameter_and_bit(model_dir, tmp_path):
    from safetensors.torch import save_file

    from diffprune.base import fingerprint
    from diffprune.serving.pages import move_to_huge_pages

    own = load_base(str(model_dir), 2)
    params = dict(own.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    if move_to_huge_pages(own.model):  # False where the system gives no such advice
        storages = [p.untyped_storage().data_ptr() for p in params.values()]
        assert len(set(storages)) == len(storages)  # each its own storage, as safetensors needs
    assert all(p is params[n] and torch.equal(p, before[n]) for n, p in own.model.named_parameters())
    assert fingerprint(own.base_parameters()) == own.fingerprint
    save_file({n: p.detach() for n, p in params.items()}, str(tmp_path / "w.safetensors"))


def test_registration_reads_headers_and_loads_on_first_use(folder, base):
    bank = TaskBank(base, folder)
    assert bank.names() == ["m", "t0", "t1", "t2", "t3"] and bank.loaded_names() == []
    assert bank.describe("t1")["labels"] == ["t1-0", "t1-1", "t1-2"]
    bank.get("t1")
    assert bank.loaded_names() == ["t1"] and bank.describe("t1")["loaded"]


def test_the_memory_bound_lets_the_least_recently_used_leave(folder, base):
    bank = TaskBank(base, folder)
    one = bank.task_bytes(bank.get("t0"))
    mask = bank.task_bytes(bank.get("m"))  # a mask patch is kept as its TaskPatch: larger
    bank.memory_bytes = one + mask + one // 2  # room for t0 and m, not for t3 beside them
    for name in ("t0", "t3", "t0", "m"):  # t3 is now the least recently used
        bank.get(name)
    assert bank.loaded_names() == ["t0", "m"]
    assert bank.loaded_bytes() <= bank.memory_bytes


def test_a_loaded_task_keeps_one_compact_form_that_switching_reads(folder, base):
    """A patch that can join mixed batches is kept as gap-coded positions and the file's values
    (float16 here), near its file's size; switching applies that very form, keeping only the
    index of the tensors it writes and its work split. A mask patch is kept as its TaskPatch."""
    bank = TaskBank(base, folder)
    assert isinstance(bank.get("m").patch, TaskPatch)
    random_patch(base, 0.05, 2, seed=7, task="fp16").save(folder / "fp16.safetensors")
    bank.rescan()
    task = bank.get("fp16")
    c = task.diffs
    assert isinstance(task.patch, CompactPatch) and c.value_dtype == torch.float16
    before = bank.task_bytes(task)
    head = sum(t.nbytes for t in task.head.values())
    assert before == c.stream.nbytes + c.bits.nbytes + c.table.nbytes + c.checks.nbytes + head
    assert c.bits.nbytes == 2 * c.nnz and c.stream.nbytes < 1.5 * c.nnz
    assert before <= 1.2 * (folder / "fp16.safetensors").stat().st_size
    Engine(bank).run([Request("fp16", TEXTS)])
    split = sum(w.nbytes + b.nbytes for w, b in state_of(base.model).prepared_for(task.patch).splits.values())
    assert 0 < split <= 40 * (len(c.names) + 2) + 8 * 3  # a run per tensor (and per cut), its bounds
    assert bank.task_bytes(task) == before + 8 * len(c.names) + split


def test_patches_are_added_and_removed_while_serving(folder, base, tmp_path_factory):
    bank = TaskBank(base, folder)
    engine = Engine(bank)
    engine.run([Request("t0", TEXTS)])
    (folder / "t0.safetensors").unlink()
    shutil.copy(folder / "t3.safetensors", folder / "new.safetensors")
    change = bank.rescan()
    assert change["added"] == ["new"] and change["removed"] == ["t0"]
    assert isinstance(engine.run([Request("t0", TEXTS)])[0], UnknownTask)
    elsewhere = tmp_path_factory.mktemp("other") / "x.safetensors"
    shutil.copy(folder / "t1.safetensors", elsewhere)
    assert bank.add(elsewhere, "extra") == "extra" and "extra" in bank.names()
    bank.remove("extra")
    with pytest.raises(UnknownTask):
        bank.get("extra")


def test_what_is_not_a_patch_of_this_base_is_refused_with_the_reason(folder, base, tmp_path):
    other = load_base(str(tiny_bert(tmp_path / "other", dropout=0.0, initializer_range=0.05)), 2)
    random_patch(other, 0.05, 2, task="o").save(folder / "other.safetensors")
    from safetensors.torch import save_file

    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, folder / "adapter_model.safetensors")
    run = folder / "full-run"
    (run / "model").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"method": "full"}))
    (folder / "bad name!.safetensors").write_bytes((folder / "t0.safetensors").read_bytes())
    bank = TaskBank(base, folder)
    assert "other" not in bank.names()
    assert other.fingerprint in bank.refused["other.safetensors"] and base.fingerprint in bank.refused["other.safetensors"]
    assert "not a diffprune patch" in bank.refused["adapter_model.safetensors"]
    assert "method 'full'" in bank.refused["full-run"]
    assert "cannot be a task name" in bank.refused["bad name!.safetensors"]


def test_a_head_kind_it_cannot_run_is_refused(folder, base):
    patch = random_patch(base, 0.05, 2, task="h")
    patch.meta["head"] = "layer-mix"
    patch.save(folder / "h.safetensors")
    bank = TaskBank(base, folder)
    assert "head is of kind 'layer-mix'" in bank.refused["h.safetensors"]
    assert "cls-mix" in bank.refused["h.safetensors"]


def test_a_head_of_the_wrong_shape_fails_its_requests_only(folder, base):
    patch = random_patch(base, 0.05, 2, task="w")
    patch.head["classifier.weight"] = torch.zeros(2, 7)
    patch.save(folder / "w.safetensors")
    results = Engine(TaskBank(base, folder)).run([Request("w", TEXTS), Request("t0", TEXTS)])
    assert isinstance(results[0], DiffpruneError) and "classifier.weight" in str(results[0])
    assert len(results[1]) == len(TEXTS)


def test_apply_without_head_leaves_the_model_head_and_reverts_bit_for_bit(base):
    patch = random_patch(base, 0.05, 3, task="h3")
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    for _ in range(2):  # the second apply reuses what the first prepared
        with apply_patch(patch, base, head=False):
            changed = [n for n, p in base.model.named_parameters() if not torch.equal(p, before[n])]
            assert changed and not set(changed) & base.head_names
        assert all(torch.equal(p, before[n]) for n, p in base.model.named_parameters())


def test_a_prepared_patch_follows_a_replaced_parameter(model_dir):
    """What an apply prepared is bound to the very parameter objects: a parameter replaced by a
    copy of the same bits gets the patch written into the new one, and reverted from it."""
    own = load_base(str(model_dir), 2)
    patch = random_patch(own, 0.05, 2)
    patch.head = {n: p.detach().clone() for n, p in own.head_parameters().items()}
    apply_patch(patch, own).revert()
    query = own.model.bert.encoder.layer[0].attention.self.query
    old = query.weight
    query.weight = torch.nn.Parameter(old.detach().clone())
    name = "bert.encoder.layer.0.attention.self.query.weight"
    with apply_patch(patch, own):
        assert torch.equal(query.weight, old + patch.dense_diff(name))
        assert not torch.equal(query.weight, old)
    assert torch.equal(query.weight, old)


def test_the_kernel_and_the_block_sparse_product_agree(folder, base):
    """On the CPU without gradients the numba kernel writes the Linear deltas and the base's product
    is added into them; with gradients the block-diagonal sparse product adds them after: the
    same numbers. After the block every Linear has its own forward again."""
    from diffprune.serving.heads import forward_with_heads
    from diffprune.serving.mixed import MixedBatch

    patches = [TaskPatch.load(folder / f"t{i}.safetensors") for i in (0, 1, 3)]
    row_slots = torch.tensor([2, 0, 1, 0])
    encoded = dict(base.tokenizer(["a b c", "d e", "f g h i", "j"], padding=True, return_tensors="pt"))
    heads, kinds = [p.head for p in patches], ["model"] * 3
    results = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad), MixedBatch(base.model, [p.diffs for p in patches], row_slots).installed():
            results.append(forward_with_heads(base, heads, kinds, row_slots, encoded).detach())
    assert torch.allclose(results[0], results[1], atol=1e-5)
    assert not any("forward" in m.__dict__ for m in base.model.modules())


def test_serve_binds_localhost_takes_its_key_from_the_environment_and_shuts_down_cleanly(folder, model_dir):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "diffprune", "serve", "--patches", str(folder), "--base",
                               str(model_dir), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "DIFFPRUNE_API_KEY": "k3y"})
    key = {"X-API-Key": "k3y"}
    try:
        deadline, up = time.monotonic() + 120, False
        while time.monotonic() < deadline and not up and server.poll() is None:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/health", headers=key, timeout=2).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.3)
        assert up, server.stderr.read() if server.poll() is not None else "not up"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 401
        got = httpx.post(f"http://127.0.0.1:{port}/tasks/t2/predict", json={"inputs": [["a", "b"]]}, headers=key,
                         timeout=30)
        assert "value" in got.json()["predictions"][0]
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert f"at http://127.0.0.1:{port} (API key required)" in out


def test_a_base_changed_in_place_gets_fresh_copies_of_its_small_tensors(model_dir):
    """Copies of small base tensors are shared between patches of one base only: after the
    model's weights change (a new base), a patch for the new base reverts to the new bits."""
    own = load_base(str(model_dir), 2)
    first = random_patch(own, 0.05, 2, seed=1)
    apply_patch(first, own, head=False).revert()
    bias = own.model.bert.encoder.layer[0].output.dense.bias
    with torch.no_grad():
        bias.add_(1.0)  # now another base
    from diffprune.base import fingerprint

    second = random_patch(own, 0.05, 2, seed=2)
    second.meta["fingerprint"] = fingerprint(own.base_parameters())
    changed = bias.detach().clone()
    apply_patch(second, own, head=False).revert()
    assert torch.equal(bias, changed)


def test_a_rewritten_file_is_read_again_and_a_taken_name_refused(folder, base):
    bank = TaskBank(base, folder)
    first = bank.get("t0")
    random_patch(base, 0.05, 2, seed=42, task="t0").save(folder / "t0.safetensors", "float32")
    bank.rescan()
    second = bank.get("t0")
    assert second is not first and not torch.equal(second.head["classifier.weight"], first.head["classifier.weight"])
    run = folder / "t0"
    run.mkdir()
    (run / "patch.safetensors").write_bytes((folder / "t1.safetensors").read_bytes())
    bank.rescan()  # the run folder sorts first and keeps the name
    assert "task name 't0' is taken by t0/patch.safetensors" in bank.refused["t0.safetensors"]
