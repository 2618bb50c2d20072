"""Task patch files: round trips, exact apply/revert, strict checks, corrupt files, export."""

import copy
import json

import numpy as np
import pytest
import torch

from diffprune.base import load_base
from diffprune.errors import DiffpruneError
from diffprune.patch import SparseDiff, TaskPatch, export_model, information_bound_bits


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    BertForSequenceClassification(config).save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    # vocab=, not vocab_file=: transformers 5 ignores the file and builds the 5 special tokens only
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(path)
    return path


@pytest.fixture
def base(tiny_dir):
    return load_base(tiny_dir)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (3, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model):
    with torch.no_grad():
        return model(**_inputs()).logits


def _random_patch(base, density=0.05, seed=0, **meta):
    g = torch.Generator().manual_seed(seed)
    dense = {}
    for name, p in base.base_parameters().items():
        mask = torch.rand(p.shape, generator=g) < density
        dense[name] = torch.randn(p.shape, generator=g) * 0.05 * mask
    head = {n: torch.randn(p.shape, generator=g) for n, p in base.head_parameters().items()}
    meta = {"base": base.name, "fingerprint": base.fingerprint, "method": "random", "task": "toy", **meta}
    return TaskPatch.from_dense_diffs(dense, head, meta), dense, head


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_from_dense_diffs_keeps_nonzeros(base):
    patch, dense, head = _random_patch(base)
    assert patch.nnz == sum(int((d != 0).sum()) for d in dense.values())
    assert patch.meta["base_params"] == base.num_base_params
    for name, d in patch.diffs.items():
        assert d.positions.dtype == torch.int64 and d.values.dtype == torch.float32
        assert torch.equal(patch.dense_diff(name), dense[name])
    assert set(patch.head) == set(base.head_names)


def test_from_models(base):
    base_state = {n: p.detach().clone() for n, p in base.base_parameters().items()}
    task_state = copy.deepcopy(base_state)
    task_state["bert.embeddings.word_embeddings.weight"][3, :5] += 1.0
    task_state["bert.encoder.layer.1.output.dense.bias"][7] -= 0.5
    patch = TaskPatch.from_models(base_state, task_state, {}, {"fingerprint": base.fingerprint})
    assert patch.nnz == 6
    assert set(patch.diffs) == {"bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.dense.bias"}
    assert patch.diffs["bert.encoder.layer.1.output.dense.bias"].positions.tolist() == [7]
    bad = {**task_state, "bert.pooler.dense.bias": torch.zeros(5)}
    with pytest.raises(DiffpruneError, match="pooler.dense.bias"):
        TaskPatch.from_models(base_state, bad, {}, {"fingerprint": base.fingerprint})


@pytest.mark.parametrize("dtype,atol", [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 1e-2)])
def test_save_load_round_trip(base, tmp_path, dtype, atol):
    patch, _, _ = _random_patch(base, labels=["no", "yes"], metrics={"acc": 0.5})
    size = patch.save(tmp_path / "p.safetensors", value_dtype=dtype)
    assert size == (tmp_path / "p.safetensors").stat().st_size
    loaded = TaskPatch.load(tmp_path / "p.safetensors")
    assert loaded.meta == patch.meta
    assert set(loaded.diffs) == set(patch.diffs)
    for name, d in patch.diffs.items():
        e = loaded.diffs[name]
        assert e.shape == d.shape and e.values.dtype == torch.float32
        assert torch.equal(e.positions, d.positions)
        if atol == 0:
            assert torch.equal(e.values, d.values)
        else:
            torch.testing.assert_close(e.values, d.values, atol=atol, rtol=atol)
    for name, t in patch.head.items():
        assert torch.equal(loaded.head[name], t)  # the head is always stored in float32
    assert loaded.info()["value_dtype"] == dtype and loaded.info()["bytes"] == size


def test_apply_matches_direct_weights_and_reverts_bit_for_bit(base):
    patch, dense, head = _random_patch(base)
    before = _state(base.model)
    base_logits = _logits(base.model)
    direct = copy.deepcopy(base.model)
    with torch.no_grad():
        for name, p in direct.named_parameters():
            p.add_(dense[name]) if name in dense else p.copy_(head[name])
    applied = patch.apply(base.model, base.fingerprint)
    assert torch.equal(_logits(base.model), _logits(direct))
    assert not torch.equal(_logits(base.model), base_logits)
    applied.revert()
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(DiffpruneError, match="already been reverted"):
        applied.revert()
    with patch.apply(base.model, base.fingerprint):  # the context-manager form reverts on exit
        assert not torch.equal(_logits(base.model), base_logits)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


def test_loaded_patch_applies_like_the_original(base, tmp_path):
    patch, _, _ = _random_patch(base)
    patch.save(tmp_path / "p.safetensors", value_dtype="float32")
    with patch.apply(base.model, base.fingerprint):
        expected = _logits(base.model)
    with TaskPatch.load(tmp_path / "p.safetensors").apply(base.model, base.fingerprint):
        assert torch.equal(_logits(base.model), expected)


def test_wrong_fingerprint_names_both(base):
    patch, _, _ = _random_patch(base)
    with pytest.raises(DiffpruneError) as e:
        patch.apply(base.model, "sha256:other")
    assert base.fingerprint in str(e.value) and "sha256:other" in str(e.value)


def test_shape_mismatch_refused(base, tiny_dir):
    patch, _, _ = _random_patch(base)
    three = load_base(tiny_dir, num_labels=3)
    assert three.fingerprint == base.fingerprint  # same base, different head
    before = _state(three.model)
    with pytest.raises(DiffpruneError, match="classifier.weight"):
        patch.apply(three.model, three.fingerprint)
    assert all(torch.equal(before[k], v) for k, v in three.model.state_dict().items())  # untouched
    bad = TaskPatch({"bert.pooler.dense.bias": SparseDiff((33,), torch.tensor([1]), torch.tensor([1.0]))}, {},
                    {"fingerprint": base.fingerprint})
    with pytest.raises(DiffpruneError, match=r"bert.pooler.dense.bias.*\(33,\).*\(32,\)"):
        bad.apply(base.model, base.fingerprint)
    missing = TaskPatch({"nope.weight": SparseDiff((2,), torch.tensor([1]), torch.tensor([1.0]))}, {},
                        {"fingerprint": base.fingerprint})
    with pytest.raises(DiffpruneError, match="nope.weight"):
        missing.apply(base.model, base.fingerprint)


def test_bad_patches_refused(base, tmp_path):
    with pytest.raises(DiffpruneError, match="fingerprint"):
        TaskPatch({}, {}, {})
    with pytest.raises(DiffpruneError, match="sorted"):
        TaskPatch({"a": SparseDiff((4,), torch.tensor([2, 1]), torch.ones(2))}, {}, {"fingerprint": "x"})
    with pytest.raises(DiffpruneError, match="NaN"):
        TaskPatch.from_dense_diffs({"a": torch.tensor([0.0, float("nan")])}, {}, {"fingerprint": "x"})
    big = TaskPatch.from_dense_diffs({"a": torch.tensor([0.0, 1e6])}, {}, {"fingerprint": "x"})
    with pytest.raises(DiffpruneError, match="float16"):
        big.save(tmp_path / "big.safetensors")
    with pytest.raises(DiffpruneError, match="value dtype"):
        big.save(tmp_path / "big.safetensors", value_dtype="int8")
    assert not (tmp_path / "big.safetensors").exists()


def test_corrupt_files_refused(base, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    patch, _, _ = _random_patch(base)
    good = tmp_path / "good.safetensors"
    patch.save(good)
    raw = good.read_bytes()
    cases = {"half.safetensors": raw[: len(raw) // 2], "garbage.safetensors": np.random.bytes(4096), "empty.safetensors": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with safe_open(str(good), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    table = json.loads(metadata["tensors"])
    table[0][2] += 1  # one more nnz than the positions hold
    save_file(tensors, str(tmp_path / "table.safetensors"), metadata={**metadata, "tensors": json.dumps(table)})
    save_file(tensors, str(tmp_path / "format.safetensors"), metadata={**metadata, "format": "pt"})
    save_file({**tensors, "values": tensors["values"][:-1].clone()}, str(tmp_path / "values.safetensors"), metadata=metadata)
    save_file(tensors, str(tmp_path / "version.safetensors"), metadata={**metadata, "format_version": "9"})
    nan = tensors["values"].clone()
    nan[0] = float("nan")
    save_file({**tensors, "values": nan}, str(tmp_path / "nan.safetensors"), metadata=metadata)
    meta = {**json.loads(metadata["meta"]), "base_params": "many"}
    save_file(tensors, str(tmp_path / "meta.safetensors"), metadata={**metadata, "meta": json.dumps(meta)})
    for name in [*cases, "table.safetensors", "format.safetensors", "values.safetensors", "version.safetensors",
                 "nan.safetensors", "meta.safetensors"]:
        with pytest.raises(DiffpruneError) as e:
            TaskPatch.load(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DiffpruneError, match="does not exist"):
        TaskPatch.load(tmp_path / "missing.safetensors")

    # a bitmask row with no entries is valid (an empty mask decodes to nothing) and must not crash
    rows = [["extra.bias", [32], 0, "bitmask", 0, 4]] + [[*r[:4], r[4] + 4, r[5]] for r in json.loads(metadata["tensors"])]
    save_file({**tensors, "positions": torch.cat([torch.zeros(4, dtype=torch.uint8), tensors["positions"]])},
              str(tmp_path / "empty-row.safetensors"), metadata={**metadata, "tensors": json.dumps(rows)})
    assert TaskPatch.load(tmp_path / "empty-row.safetensors").diffs["extra.bias"].nnz == 0


def test_export_loads_with_transformers(base, tmp_path):
    from transformers import AutoModelForSequenceClassification

    patch, _, _ = _random_patch(base, labels=["neg", "pos"], num_labels=2)
    before = _state(base.model)
    with patch.apply(base.model, base.fingerprint):
        expected = _logits(base.model)
    out = export_model(patch, base, tmp_path / "export")
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())  # reverted
    exported = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert torch.equal(_logits(exported), expected)
    assert exported.config.id2label == {0: "neg", 1: "pos"}
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()


def test_info(base, tmp_path):
    patch, _, _ = _random_patch(base, density=0.01, labels=["a", "b"], num_labels=2)
    info = patch.info()
    assert info["nnz"] == patch.nnz and info["base_params"] == base.num_base_params
    assert info["density"] == pytest.approx(patch.nnz / base.num_base_params)
    assert info["bytes"] is None and info["value_dtype"] is None
    assert (info["fingerprint"], info["method"], info["task"], info["base"]) == (base.fingerprint, "random", "toy", base.name)
    assert {t["name"] for t in info["tensors"]} == set(patch.diffs)
    row = info["tensors"][0]
    assert set(row) >= {"name", "shape", "nnz", "codec", "position_bytes"}
    assert {h["name"] for h in info["head"]} == set(base.head_names)
    size = patch.save(tmp_path / "p.safetensors", value_dtype="bfloat16")
    info = patch.info()
    assert info["bytes"] == size and info["value_dtype"] == "bfloat16"
    assert info["position_bytes"] < size
    json.dumps(TaskPatch.load(tmp_path / "p.safetensors").info())


def test_head_only_patch_round_trip(base, tmp_path):
    head = {n: torch.ones(p.shape) for n, p in base.head_parameters().items()}
    patch = TaskPatch.from_dense_diffs({n: torch.zeros(p.shape) for n, p in base.base_parameters().items()}, head,
                                       {"fingerprint": base.fingerprint})
    assert patch.nnz == 0 and patch.diffs == {}
    patch.save(tmp_path / "h.safetensors")
    loaded = TaskPatch.load(tmp_path / "h.safetensors")
    assert loaded.nnz == 0 and all(torch.equal(loaded.head[n], head[n]) for n in head)
    with pytest.raises(DiffpruneError, match="changes no entry"):
        loaded.dense_diff("bert.pooler.dense.bias")


@pytest.mark.integration
def test_packaged_model_half_percent_patch(tmp_path):
    base = load_base()
    params = base.base_parameters()
    names = list(params)
    sizes = np.array([params[n].numel() for n in names])
    total, nnz = int(sizes.sum()), round(0.005 * int(sizes.sum()))
    rng = np.random.default_rng(0)
    flat = np.sort(rng.choice(total, size=nnz, replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    cuts = np.searchsorted(flat, starts)
    diffs = {}
    for i, name in enumerate(names):
        pos = flat[cuts[i] : cuts[i + 1]] - starts[i]
        if pos.size:
            values = torch.from_numpy(rng.normal(0, 1e-3, pos.size).astype(np.float32))
            diffs[name] = SparseDiff(tuple(params[name].shape), torch.from_numpy(pos), values)
    head = {n: torch.randn(p.shape) for n, p in base.head_parameters().items()}
    patch = TaskPatch(diffs, head, {"fingerprint": base.fingerprint, "base_params": total, "base": base.name})
    assert patch.nnz == nnz
    size = patch.save(tmp_path / "p.safetensors", value_dtype="float16")
    bound_bits = information_bound_bits(total, nnz) + 16 * nnz
    assert size * 8 <= 1.1 * bound_bits, (size, bound_bits / 8)
    loaded = TaskPatch.load(tmp_path / "p.safetensors")
    before = _state(base.model)
    applied = loaded.apply(base.model, base.fingerprint)
    changed = base.model.state_dict()
    assert not all(torch.equal(before[k], changed[k]) for k in before)
    applied.revert()
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


def test_export_refuses_a_folder_in_use(base, tmp_path):
    patch, _, _ = _random_patch(base)
    used = tmp_path / "run"
    used.mkdir()
    (used / "run.json").write_text("{}")
    with pytest.raises(DiffpruneError, match="not an empty folder"):
        export_model(patch, base, used)
    assert [p.name for p in used.iterdir()] == ["run.json"]  # nothing lost, nothing added


def test_plot_panels_get_distinct_titles(base):
    from diffprune.patch.plot import panel_labels

    mrpc, sts = (_random_patch(base, task=task, method="diff")[0] for task in ("MRPC", "STS-B"))
    assert panel_labels(["a", "b"], [mrpc, sts]) == ["MRPC (diff)", "STS-B (diff)"]
    assert panel_labels(["s1/patch", "s2/patch"], [mrpc, mrpc]) == ["s1/patch", "s2/patch"]  # two seeds
    assert panel_labels(["a", "a"], [mrpc, mrpc]) == ["a", "a [2]"]  # one file twice: two panels, not one
