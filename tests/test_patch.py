"""Task patch files: round trips, exact apply/revert, strict checks, corrupt files, export."""

import copy
import json

import numpy as np
import pytest
import torch

from diffprune.errors import DiffpruneError
from diffprune.patch import SparseDiff, TaskPatch, export_model, information_bound_bits
from diffprune.base import load_base
from patch_helpers import logits_of, random_patch, state_of


@pytest.fixture
def base(own_vocab_dir):
    return load_base(own_vocab_dir)


def test_from_dense_diffs_keeps_nonzeros(base):
    patch, dense, head = random_patch(base)
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
    patch, _, _ = random_patch(base, labels=["no", "yes"], metrics={"acc": 0.5})
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
    patch, dense, head = random_patch(base)
    before = state_of(base.model)
    base_logits = logits_of(base.model)
    direct = copy.deepcopy(base.model)
    with torch.no_grad():
        for name, p in direct.named_parameters():
            p.add_(dense[name]) if name in dense else p.copy_(head[name])
    applied = patch.apply(base)
    assert torch.equal(logits_of(base.model), logits_of(direct))
    assert not torch.equal(logits_of(base.model), base_logits)
    applied.revert()
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(DiffpruneError, match="already been reverted"):
        applied.revert()
    with patch.apply(base):  # the context-manager form reverts on exit
        assert not torch.equal(logits_of(base.model), base_logits)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


def test_loaded_patch_applies_like_the_original(base, tmp_path):
    patch, _, _ = random_patch(base)
    patch.save(tmp_path / "p.safetensors", value_dtype="float32")
    with patch.apply(base):
        expected = logits_of(base.model)
    with TaskPatch.load(tmp_path / "p.safetensors").apply(base):
        assert torch.equal(logits_of(base.model), expected)


def test_wrong_fingerprint_names_both(base):
    patch, _, _ = random_patch(base, fingerprint="sha256:other")
    before = state_of(base.model)
    for target in (base, base.model):
        with pytest.raises(DiffpruneError) as e:
            patch.apply(target)
        assert base.fingerprint in str(e.value) and "sha256:other" in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


def test_shape_mismatch_refused(base, own_vocab_dir):
    patch, _, _ = random_patch(base)
    three = load_base(own_vocab_dir, num_labels=3)
    assert three.fingerprint == base.fingerprint  # same base, different head
    before = state_of(three.model)
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
    patch, _, _ = random_patch(base)
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
    patch, _, _ = random_patch(base)
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
    patch, _, _ = random_patch(base)
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

    patch, _, _ = random_patch(base)
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
        expected = state_of(base.model)
    with loaded.apply(base):
        assert all(torch.equal(expected[k], v) for k, v in base.model.state_dict().items())
    # A version-1 header on a file that carries a digest is a damaged version-2 file.
    save_file(tensors, str(tmp_path / "v1-digest.safetensors"), metadata={**metadata, "digest": "sha256:0"})
    with pytest.raises(DiffpruneError, match="says format version 1"):
        TaskPatch.load(tmp_path / "v1-digest.safetensors")


def test_export_loads_with_transformers(base, tmp_path):
    from transformers import AutoModelForSequenceClassification

    patch, _, _ = random_patch(base, labels=["neg", "pos"], num_labels=2)
    before = state_of(base.model)
    with patch.apply(base):
        expected = logits_of(base.model)
    out = export_model(patch, base, tmp_path / "export")
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())  # reverted
    exported = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert torch.equal(logits_of(exported), expected)
    assert exported.config.id2label == {0: "neg", 1: "pos"}
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()


def test_info(base, tmp_path):
    patch, _, _ = random_patch(base, density=0.01, labels=["a", "b"], num_labels=2)
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
    before = state_of(base.model)
    applied = loaded.apply(base)
    changed = base.model.state_dict()
    assert not all(torch.equal(before[k], changed[k]) for k in before)
    applied.revert()
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


def test_export_refuses_a_folder_in_use(base, tmp_path):
    patch, _, _ = random_patch(base)
    used = tmp_path / "run"
    used.mkdir()
    (used / "run.json").write_text("{}")
    with pytest.raises(DiffpruneError, match="not an empty folder"):
        export_model(patch, base, used)
    assert [p.name for p in used.iterdir()] == ["run.json"]  # nothing lost, nothing added


def test_plot_panels_get_distinct_titles(base):
    from diffprune.patch.plot import panel_labels

    mrpc, sts = (random_patch(base, task=task, method="diff")[0] for task in ("MRPC", "STS-B"))
    assert panel_labels(["a", "b"], [mrpc, sts]) == ["MRPC (diff)", "STS-B (diff)"]
    assert panel_labels(["s1/patch", "s2/patch"], [mrpc, mrpc]) == ["s1/patch", "s2/patch"]  # two seeds
    assert panel_labels(["a", "a"], [mrpc, mrpc]) == ["a", "a [2]"]  # one file twice: two panels, not one


def test_a_negative_base_parameter_count_is_refused(base):
    patch, _, _ = random_patch(base)
    with pytest.raises(DiffpruneError, match="'base_params' is negative: -5"):
        TaskPatch(patch.diffs, patch.head, {**patch.meta, "base_params": -5})
