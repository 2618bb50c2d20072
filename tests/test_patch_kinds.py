"""The kinds of change a patch holds (add, mask, sparse): apply, revert, round trips, info,
export and the storage bound of each; apply's checks of the model it is given; the plot."""

import copy

import pytest
import torch

from diffprune.errors import DiffpruneError
from diffprune.patch import SparseDiff, TaskPatch, export_model, information_bound_bits
from diffprune.base import load_base
from patch_helpers import logits_of, random_patch, state_of


@pytest.fixture
def base(own_vocab_dir):
    return load_base(own_vocab_dir)


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
    patch, dense, _ = random_patch(base, seed=seed)
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
    before = state_of(base.model)
    base_logits = logits_of(base.model)
    with patch.apply(base):
        _assert_state(base.model, expected)
        assert not torch.equal(logits_of(base.model), base_logits)
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
        assert torch.equal(logits_of(exported), logits_of(base.model))


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
    first, _, _ = random_patch(base, seed=1)
    second, _ = _kind_patch(base, "mask")
    head_only = TaskPatch({}, first.head, first.meta)
    before = state_of(base.model)
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
    patch, _, _ = random_patch(base)
    before = state_of(base.model)
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
    added, _, _ = random_patch(base)
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
