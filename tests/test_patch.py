"""Task patch files: round trips, exact apply/revert, strict checks, corrupt files, export."""

import copy
import json

import numpy as np
import pytest
import torch

from conftest import tiny_bert_own_vocab
from diffprune.base import load_base
from diffprune.errors import DiffpruneError
from diffprune.patch import SparseDiff, TaskPatch, export_model, information_bound_bits


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_bert_own_vocab(tmp_path_factory.mktemp("tiny-bert"))


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
    applied = patch.apply(base)
    assert torch.equal(_logits(base.model), _logits(direct))
    assert not torch.equal(_logits(base.model), base_logits)
    applied.revert()
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(DiffpruneError, match="already been reverted"):
        applied.revert()
    with patch.apply(base):  # the context-manager form reverts on exit
        assert not torch.equal(_logits(base.model), base_logits)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


def test_loaded_patch_applies_like_the_original(base, tmp_path):
    patch, _, _ = _random_patch(base)
    patch.save(tmp_path / "p.safetensors", value_dtype="float32")
    with patch.apply(base):
        expected = _logits(base.model)
    with TaskPatch.load(tmp_path / "p.safetensors").apply(base):
        assert torch.equal(_logits(base.model), expected)


def test_wrong_fingerprint_names_both(base):
    patch, _, _ = _random_patch(base, fingerprint="sha256:other")
    before = _state(base.model)
    for target in (base, base.model):
        with pytest.raises(DiffpruneError) as e:
            patch.apply(target)
        assert base.fingerprint in str(e.value) and "sha256:other" in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


def test_shape_mismatch_refused(base, tiny_dir):
    patch, _, _ = _random_patch(base)
    three = load_base(tiny_dir, num_labels=3)
    assert three.fingerprint == base.fingerprint  # same base, different head
    before = _state(three.model)
    with pytest.raises(DiffpruneError, match="classifier.weight"):
        patch.apply(three)
    assert all(torch.equal(before[k], v) for k, v in three.model.state_dict().items())  # untouched
    bad = TaskPatch({"bert.pooler.dense.bias": SparseDiff((33,), torch.tensor([1]), torch.tensor([1.0]))}, {},
                    {"fingerprint": base.fingerprint})
    with pytest.raises(DiffpruneError, match=r"bert.pooler.dense.bias.*\(33,\).*\(32,\)"):
        bad.apply(base)
    missing = TaskPatch({"nope.weight": SparseDiff((2,), torch.tensor([1]), torch.tensor([1.0]))}, {},
                        {"fingerprint": base.fingerprint})
    with pytest.raises(DiffpruneError, match="nope.weight"):
        missing.apply(base)


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


def _contents(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _resave(path, metadata, tensors, redigest=True):
    """Write a patch file as diffprune would, but from edited contents; with `redigest` the digest
    is recomputed, so that the checks behind it are what refuses the edit."""
    from safetensors.torch import save_file

    from diffprune.patch.format import digest

    if redigest:
        metadata = {**metadata, "digest": digest(metadata, tensors)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_corrupt_files_refused(base, tmp_path):
    patch, _, _ = _random_patch(base)
    good = tmp_path / "good.safetensors"
    patch.save(good)
    raw = good.read_bytes()
    cases = {"half.safetensors": raw[: len(raw) // 2], "garbage.safetensors": np.random.bytes(4096), "empty.safetensors": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    metadata, tensors = _contents(good)
    table = json.loads(metadata["tensors"])
    table[0][2] += 1  # one more nnz than the positions hold
    nan = tensors["values"].clone()
    nan[0] = float("nan")
    meta = {**json.loads(metadata["meta"]), "base_params": "many"}
    # Each edit with its digest recomputed: the check behind the digest refuses it, with this reason.
    edits = {
        "table": ({**metadata, "tensors": json.dumps(table)}, tensors, "positions of"),
        "format": ({**metadata, "format": "pt"}, tensors, "format is 'pt'"),
        "values": (metadata, {**tensors, "values": tensors["values"][:-1].clone()}, "the values end before"),
        "version": ({**metadata, "format_version": "9"}, tensors, "format version '9'"),
        "nan": (metadata, {**tensors, "values": nan}, "not finite"),
        "meta": ({**metadata, "meta": json.dumps(meta)}, tensors, "base_params"),
        "dtype": (metadata, {**tensors, "values": tensors["values"].view(torch.bfloat16)}, "bfloat16 but its header"),
        "no-digest": ({k: v for k, v in metadata.items() if k != "digest"}, tensors, "no digest"),
        "stray": (metadata, {**tensors, "extra": torch.zeros(2)}, "unexpected tensor 'extra'"),
    }
    for name, (md, ts, reason) in edits.items():
        path = _resave(tmp_path / f"{name}.safetensors", md, ts, redigest=name != "no-digest")
        with pytest.raises(DiffpruneError, match=reason):
            TaskPatch.load(path)
    for name in [*cases, *(f"{n}.safetensors" for n in edits)]:
        with pytest.raises(DiffpruneError) as e:
            TaskPatch.load(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DiffpruneError, match="does not exist"):
        TaskPatch.load(tmp_path / "missing.safetensors")

    # a bitmask row with no entries is valid (an empty mask decodes to nothing) and must not crash
    rows = [["extra.bias", [32], 0, "bitmask", 0, 4, "add"]]
    rows += [[*r[:4], r[4] + 4, *r[5:]] for r in json.loads(metadata["tensors"])]
    positions = torch.cat([torch.zeros(4, dtype=torch.uint8), tensors["positions"]])
    _resave(tmp_path / "empty-row.safetensors", {**metadata, "tensors": json.dumps(rows)}, {**tensors, "positions": positions})
    assert TaskPatch.load(tmp_path / "empty-row.safetensors").diffs["extra.bias"].nnz == 0


def test_digest_refuses_any_changed_byte_and_header_edit(base, tmp_path):
    patch, _, _ = _random_patch(base)
    good = tmp_path / "good.safetensors"
    patch.save(good)
    raw = bytearray(good.read_bytes())
    raw[-3] ^= 0x01  # the last tensor's bytes: a head entry or a value, each a valid number
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    metadata, tensors = _contents(good)
    table = json.loads(metadata["tensors"])
    same = [i for i, r in enumerate(table) if r[1] == table[-1][1]]
    table[same[0]][0], table[same[-1]][0] = table[same[-1]][0], table[same[0]][0]  # two tensors of one shape swapped
    head = sorted(k for k in tensors if k.startswith("head."))[0]
    edits = {
        "swapped": ({**metadata, "tensors": json.dumps(table)}, tensors),
        "bf16": (metadata, {**tensors, "values": tensors["values"].view(torch.bfloat16)}),
        "no-head": (metadata, {k: v for k, v in tensors.items() if k != head}),
        "kind": ({**metadata, "tensors": metadata["tensors"].replace('"add"]', '"sparse"]', 1)}, tensors),
    }
    assert len(same) > 1 and edits["kind"][0]["tensors"] != metadata["tensors"]
    for name, (md, ts) in edits.items():
        _resave(tmp_path / f"{name}.safetensors", md, ts, redigest=False)
    for name in ["flipped", *edits]:
        with pytest.raises(DiffpruneError, match="do not match the digest recorded in it: the file was changed or damaged"):
            TaskPatch.load(tmp_path / f"{name}.safetensors")


def test_unknown_kind_is_a_one_line_error(base, tmp_path):
    patch, _, _ = _random_patch(base)
    patch.save(tmp_path / "p.safetensors")
    metadata, tensors = _contents(tmp_path / "p.safetensors")
    table = json.loads(metadata["tensors"])
    table[0][6] = "replace"
    _resave(tmp_path / "kind.safetensors", {**metadata, "tensors": json.dumps(table)}, tensors)
    with pytest.raises(DiffpruneError, match=r"unknown patch kind 'replace' \(this diffprune knows add, mask, sparse\)"):
        TaskPatch.load(tmp_path / "kind.safetensors")
    with pytest.raises(DiffpruneError, match="unknown patch kind"):
        SparseDiff((2,), torch.tensor([0]), torch.ones(1), kind="replace")


def test_version_1_file_loads_and_applies(base, tmp_path):
    """A file as diffprune 0.1 wrote it (format version 1: rows of six fields, no digest, every
    change added) still loads, and applies like the patch it holds."""
    from safetensors.torch import save_file

    from diffprune.patch.codec import encode_positions

    patch, _, _ = _random_patch(base)
    table, blobs, offset = [], [], 0
    for name, d in patch.diffs.items():
        codec, data = encode_positions(d.positions.numpy(), d.numel)
        table.append([name, list(d.shape), d.nnz, codec, offset, int(data.size)])
        blobs.append(data)
        offset += data.size
    tensors = {"positions": torch.from_numpy(np.concatenate(blobs)),
               "values": torch.cat([d.values for d in patch.diffs.values()]).to(torch.float16)}
    tensors.update({f"head.{n}": t for n, t in patch.head.items()})
    metadata = {"format": "diffprune.patch", "format_version": "1", "tensors": json.dumps(table),
                "meta": json.dumps(patch.meta)}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=metadata)
    loaded = TaskPatch.load(tmp_path / "v1.safetensors")
    assert loaded.info()["value_dtype"] == "float16" and loaded.nnz_by_kind == {"add": patch.nnz, "mask": 0, "sparse": 0}
    patch.save(tmp_path / "v2.safetensors")  # float16 values too: the same numbers
    with TaskPatch.load(tmp_path / "v2.safetensors").apply(base):
        expected = _state(base.model)
    with loaded.apply(base):
        assert all(torch.equal(expected[k], v) for k, v in base.model.state_dict().items())
    # A version-1 header on a file that carries a digest is a damaged version-2 file.
    save_file(tensors, str(tmp_path / "v1-digest.safetensors"), metadata={**metadata, "digest": "sha256:0"})
    with pytest.raises(DiffpruneError, match="says format version 1"):
        TaskPatch.load(tmp_path / "v1-digest.safetensors")


def test_export_loads_with_transformers(base, tmp_path):
    from transformers import AutoModelForSequenceClassification

    patch, _, _ = _random_patch(base, labels=["neg", "pos"], num_labels=2)
    before = _state(base.model)
    with patch.apply(base):
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
    applied = loaded.apply(base)
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


# -- the kinds of change: add, mask, sparse -----------------------------------------------------
MASKED, PRUNED = "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.intermediate.dense.weight"


def _kind_patch(base, kind, seed=0):
    """A patch of one kind (or "mixed": a mask, a sparse tensor and added diffs elsewhere) and the
    state the model must have once it is applied, computed here without the patch code."""
    g = torch.Generator().manual_seed(seed)
    params = {n: p.detach().clone() for n, p in base.base_parameters().items()}
    head = {n: torch.randn(p.shape, generator=g) for n, p in base.head_parameters().items()}
    meta = {"base": base.name, "fingerprint": base.fingerprint, "task": "toy", "method": kind,
            "base_params": base.num_base_params}
    expected = {**params, **head}
    off = torch.rand(params[MASKED].shape, generator=g) < 0.9  # a mask at 90% sparsity
    pruned = params[PRUNED] * (torch.rand(params[PRUNED].shape, generator=g) < 0.3) + 0.01
    if kind == "mask":
        expected[MASKED] = params[MASKED].masked_fill(off, 0)
        return TaskPatch.from_masks({MASKED: off}, head, meta), expected
    if kind == "sparse":
        pruned[0] = 0  # a whole row pruned
        expected[PRUNED] = pruned
        return TaskPatch.from_sparse_tensors({PRUNED: pruned}, head, meta), expected
    patch, dense, _ = _random_patch(base, seed=seed)
    for name, d in dense.items():
        expected[name] = params[name] + d
    if kind == "add":
        return TaskPatch(patch.diffs, head, meta), expected
    expected[MASKED], expected[PRUNED] = params[MASKED].masked_fill(off, 0), pruned
    diffs = {**patch.diffs, MASKED: SparseDiff.from_mask(off), PRUNED: SparseDiff.from_sparse(pruned)}
    return TaskPatch(diffs, head, meta), expected


def _assert_state(model, expected):
    state = dict(model.named_parameters())
    assert set(state) == set(expected)
    for name, t in expected.items():
        assert torch.equal(state[name].detach(), t), name


@pytest.mark.parametrize("kind", ["add", "mask", "sparse", "mixed"])
def test_every_kind_applies_reverts_and_round_trips(base, tmp_path, kind):
    patch, expected = _kind_patch(base, kind)
    before = _state(base.model)
    base_logits = _logits(base.model)
    with patch.apply(base):
        _assert_state(base.model, expected)
        assert not torch.equal(_logits(base.model), base_logits)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())  # bit for bit
    patch.save(tmp_path / "p.safetensors", value_dtype="float32")
    loaded = TaskPatch.load(tmp_path / "p.safetensors")
    assert {n: d.kind for n, d in loaded.diffs.items()} == {n: d.kind for n, d in patch.diffs.items()}
    with loaded.apply(base):
        _assert_state(base.model, expected)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


def test_kind_constructors(base):
    off = torch.zeros(4, 3, dtype=torch.bool)
    off[1, 2] = off[3, 0] = True
    mask = SparseDiff.from_mask(off)
    assert (mask.kind, mask.positions.tolist(), mask.values.dtype, mask.values.numel()) == ("mask", [5, 9], torch.float32, 0)
    assert torch.equal(mask.to_dense(), off)
    assert SparseDiff((4, 3), [5, 9], kind="mask").positions.tolist() == [5, 9]  # values may be left out
    sparse = SparseDiff.from_sparse(torch.tensor([[0.0, 2.0], [-0.0, -1.5]]))
    assert (sparse.kind, sparse.positions.tolist(), sparse.values.tolist()) == ("sparse", [1, 3], [2.0, -1.5])
    assert torch.equal(sparse.to_dense(), torch.tensor([[0.0, 2.0], [0.0, -1.5]]))
    with pytest.raises(DiffpruneError, match="bool tensor"):
        SparseDiff.from_mask(torch.ones(3))
    with pytest.raises(DiffpruneError, match="needs values"):
        SparseDiff((3,), [1], kind="sparse")
    with pytest.raises(DiffpruneError, match="'mask' change of 'a' has 1 positions but 1 values"):
        TaskPatch({"a": SparseDiff((3,), [1], torch.ones(1), kind="mask")}, {}, {"fingerprint": "x"})
    # Nothing switched off is no change and is left out; an all-zero sparse tensor replaces its base tensor.
    meta = {"fingerprint": base.fingerprint}
    assert TaskPatch.from_masks({MASKED: torch.zeros(32, 32, dtype=torch.bool)}, {}, meta).diffs == {}
    empty = TaskPatch.from_sparse_tensors({"bert.pooler.dense.bias": torch.zeros(32)}, {}, meta)
    assert empty.diffs["bert.pooler.dense.bias"].nnz == 0 and empty.meta["base_params"] == 32
    with pytest.raises(DiffpruneError, match="is a 'mask' change"):
        TaskPatch.from_masks({MASKED: off.new_ones(32, 32)}, {}, meta).dense_diff(MASKED)


def test_info_counts_per_kind(base, tmp_path):
    patch, _ = _kind_patch(base, "mixed")
    info = patch.info()
    masked, pruned = patch.diffs[MASKED].nnz, patch.diffs[PRUNED].nnz
    assert info["nnz_by_kind"] == {"add": patch.nnz - masked - pruned, "mask": masked, "sparse": pruned}
    assert info["tensors_by_kind"] == {"add": len(patch.diffs) - 2, "mask": 1, "sparse": 1}
    rows = {t["name"]: t for t in info["tensors"]}
    assert (rows[MASKED]["kind"], rows[MASKED]["nnz"], rows[MASKED]["codec"]) == ("mask", masked, "elias-fano-complement")
    assert rows[PRUNED]["kind"] == "sparse" and {r["kind"] for r in rows.values()} == {"add", "mask", "sparse"}
    size = patch.save(tmp_path / "p.safetensors")
    loaded = TaskPatch.load(tmp_path / "p.safetensors").info()
    assert loaded["nnz_by_kind"] == info["nnz_by_kind"] and loaded["bytes"] == size


def test_export_writes_every_kind(base, tmp_path):
    from transformers import AutoModelForSequenceClassification

    patch, expected = _kind_patch(base, "mixed")
    out = export_model(patch, base, tmp_path / "export")
    exported = AutoModelForSequenceClassification.from_pretrained(out).eval()
    _assert_state(exported, expected)  # zeros where switched off or pruned
    with patch.apply(base):
        assert torch.equal(_logits(exported), _logits(base.model))


def test_storage_bound_per_kind(base):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from storage import bound_bytes

    patch, _ = _kind_patch(base, "mixed")
    n = base.num_base_params
    k = patch.nnz_by_kind
    masked, pruned = (patch.diffs[name].numel for name in (MASKED, PRUNED))
    expected_bits = (information_bound_bits(n, k["add"]) + 16 * k["add"]  # positions anywhere + fp16 values
                     + information_bound_bits(masked, k["mask"])  # positions only
                     + information_bound_bits(pruned, k["sparse"]) + 16 * k["sparse"])
    assert bound_bytes(patch) == pytest.approx(expected_bits / 8)
    assert bound_bytes(patch, value_bits=32) == pytest.approx((expected_bits + 16 * (k["add"] + k["sparse"])) / 8)
    mask_only, _ = _kind_patch(base, "mask")
    assert bound_bytes(mask_only) == pytest.approx(information_bound_bits(masked, k["mask"]) / 8)


# -- apply verifies the model it is given --------------------------------------------------------
def test_a_patch_already_applied_is_refused(base):
    first, _, _ = _random_patch(base, seed=1)
    second, _ = _kind_patch(base, "mask")
    head_only = TaskPatch({}, first.head, first.meta)
    before = _state(base.model)
    for patch in (first, head_only):
        applied = patch.apply(base)
        for again in (first, second, head_only):
            with pytest.raises(DiffpruneError, match="applied before and not reverted") as e:
                again.apply(base)
            assert "\n" not in str(e.value)
        applied.revert()
    # Changed since (so not exactly as the apply left it), the model is refused by its fingerprint.
    applied = first.apply(base)
    with torch.no_grad():
        base.model.classifier.bias.add_(1.0)
    with pytest.raises(DiffpruneError, match=r"is a patch already applied to it\?"):
        second.apply(base.model)
    applied.revert()
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    with second.apply(base):  # reverted: free again
        pass
    # Applied for good (its handle dropped, as evaluate_patch does): the model still refuses a
    # second patch, and nothing keeps the handle's copies of the original entries alive.
    import gc
    import weakref

    handle = weakref.ref(first.apply(base))
    gc.collect()
    assert handle() is None
    with pytest.raises(DiffpruneError, match="applied before and not reverted"):
        second.apply(base)


def test_apply_onto_a_plain_module(base):
    patch, expected = _kind_patch(base, "mixed")
    with patch.apply(base.model):
        _assert_state(base.model, expected)
    with pytest.raises(DiffpruneError, match="BaseModel or a torch module, not a str"):
        patch.apply("model")


def test_the_head_must_be_the_models_head(base):
    patch, _, _ = _random_patch(base)
    before = _state(base.model)
    frozen = "bert.embeddings.LayerNorm.bias"
    diffs = {n: d for n, d in patch.diffs.items() if n != frozen}
    missing = TaskPatch(diffs, {n: t for n, t in patch.head.items() if n != "classifier.bias"}, patch.meta)
    renamed = TaskPatch(diffs, {**missing.head, frozen: torch.ones(32)}, patch.meta)
    with pytest.raises(DiffpruneError, match="lacks the model's head tensor 'classifier.bias'"):
        missing.apply(base)
    with pytest.raises(DiffpruneError, match=f"has head tensor '{frozen}', which is a frozen base parameter"):
        renamed.apply(base)
    for bad in (missing, renamed):  # a plain module: the fingerprint no longer covers the same tensors
        with pytest.raises(DiffpruneError, match="fingerprint"):
            bad.apply(base.model)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


def test_the_fingerprint_is_cached_safely(base, monkeypatch):
    import diffprune.patch.model_state as state_module

    calls = []
    real = state_module.fingerprint
    monkeypatch.setattr(state_module, "fingerprint", lambda params: calls.append(1) or real(params))
    patch, _ = _kind_patch(base, "mixed")
    for _ in range(3):
        patch.apply(base).revert()
    with patch.apply(base.model):
        pass
    assert len(calls) == 1  # revert re-validated the cached fingerprint each time
    weight = base.model.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        weight.add_(0.0)  # an in-place write: the same bits, hashed again
    patch.apply(base).revert()
    assert len(calls) == 2
    applied = patch.apply(base)
    with torch.no_grad():
        base.model.bert.pooler.dense.bias.add_(0.0)  # written between apply and revert
    applied.revert()
    patch.apply(base).revert()
    assert len(calls) == 3
    with torch.no_grad():
        weight[0, 0] += 1.0  # another base now
    with pytest.raises(DiffpruneError, match="fingerprint"):
        patch.apply(base)
    with torch.no_grad():
        weight[0, 0] -= 1.0
    original = base.model.bert.pooler.dense.weight
    base.model.bert.pooler.dense.weight = torch.nn.Parameter(original.detach() + 1)  # a new tensor object
    with pytest.raises(DiffpruneError, match="fingerprint"):
        patch.apply(base)
    base.model.bert.pooler.dense.weight = original
    copied = copy.deepcopy(base.model)  # another model: its own fingerprint, computed for it
    with patch.apply(copied):
        pass
    assert len(calls) == 6


def test_plot_marks_each_kind(base, tmp_path):
    from diffprune.patch.plot import kind_marks, panel_title, plot_patches

    mixed, _ = _kind_patch(base, "mixed")
    added, _, _ = _random_patch(base)
    shapes = {n: tuple(p.shape) for n, p in base.base_parameters().items()}
    marks = kind_marks(mixed, shapes)
    assert marks == {("layer 00", "attention.self.query.weight"): "off", ("layer 01", "intermediate.dense.weight"): "sp"}
    assert kind_marks(added, shapes) == {}
    k = mixed.nnz_by_kind
    assert panel_title("MRPC", mixed).splitlines()[1].startswith(
        f"{k['add']:,} added, {k['mask']:,} switched off, {k['sparse']:,} kept (sparse)")
    assert panel_title("x", added).splitlines()[1].startswith(f"{added.nnz:,} added (")
    out = plot_patches({"mixed": mixed, "added": added}, shapes, tmp_path / "where.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the public API at the package root ---------------------------------------------------------
def test_the_readme_python_example_runs(tiny_dir, tmp_path):
    """The README's Python API example, run as written, on the tiny model and a patch for it."""
    import re
    from pathlib import Path

    import diffprune

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme[readme.index("**Python API.**"):], re.S).group(1)
    where = '"runs/mrpc-diff-struct/patch.safetensors"'
    assert "diffprune.load_base()" in code and where in code
    base = diffprune.load_base(tiny_dir)
    patch, _, _ = _random_patch(base)
    patch.save(tmp_path / "p.safetensors")
    code = code.replace("diffprune.load_base()", f"diffprune.load_base({str(tiny_dir)!r})")
    namespace = {}
    exec(compile(code.replace(where, repr(str(tmp_path / "p.safetensors"))), "README.md", "exec"), namespace)

    inputs = namespace["inputs"]
    with torch.no_grad(), TaskPatch.load(tmp_path / "p.safetensors").apply(base):
        assert torch.equal(namespace["logits"], base.model.eval()(**inputs).logits)
        unpatched = namespace["base"].model(**inputs).logits  # reverted: the base as loaded
    assert not torch.equal(unpatched, namespace["logits"])
    fresh = dict(base.model.named_parameters())
    assert all(torch.equal(p, fresh[n]) for n, p in namespace["base"].model.named_parameters())


def test_the_package_root_exports_the_api_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys, diffprune; assert 'torch' not in sys.modules, 'eager import'; "
            "from diffprune import DiffpruneError, TaskPatch, TrainSettings, __version__, evaluate_patch, load_base, train; "
            "import diffprune.api as api, diffprune.base as base, diffprune.patch as patch; "
            "assert (train, evaluate_patch, load_base, TaskPatch) == (api.train, api.evaluate_patch, base.load_base, "
            "patch.TaskPatch); assert TrainSettings is api.TrainSettings and set(diffprune.__all__) <= set(dir(diffprune))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_negative_base_parameter_count_is_refused(base):
    patch, _, _ = _random_patch(base)
    with pytest.raises(DiffpruneError, match="'base_params' is negative: -5"):
        TaskPatch(patch.diffs, patch.head, {**patch.meta, "base_params": -5})
