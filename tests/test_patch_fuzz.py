"""Damaged patch files, a few hundred of each kind, made by a seeded fuzzer: every one is refused
with a DiffpruneError (at load or at apply), or, where the bytes that changed do not matter (the
header's whitespace), gives exactly the model the undamaged patch gives. Nothing loads silently
changed, and no other exception escapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_bert_own_vocab
from diffprune.base import load_base
from diffprune.errors import DiffpruneError
from diffprune.patch import SparseDiff, TaskPatch
from diffprune.patch.format import digest

SEED = 20
FLIPS_PER_REGION = 12  # header, positions, values, head, and anywhere in the file
TRUNCATIONS = 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return load_base(tiny_bert_own_vocab(tmp_path_factory.mktemp("tiny-bert")))


def _patch(base, kind: str) -> TaskPatch:
    """A patch of one kind, or "mixed": added diffs, a mask at 90% sparsity and a sparse tensor."""
    g = torch.Generator().manual_seed(1)
    params = base.base_parameters()
    head = {n: torch.randn(p.shape, generator=g) for n, p in base.head_parameters().items()}
    meta = {"base": base.name, "fingerprint": base.fingerprint, "task": "toy", "method": kind,
            "base_params": base.num_base_params}
    masked, pruned = "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.output.dense.weight"
    mask = SparseDiff.from_mask(torch.rand(params[masked].shape, generator=g) < 0.9)
    sparse = SparseDiff.from_sparse(torch.randn(params[pruned].shape, generator=g)
                                    * (torch.rand(params[pruned].shape, generator=g) < 0.2))
    added = {n: SparseDiff.from_dense(torch.randn(p.shape, generator=g) * (torch.rand(p.shape, generator=g) < 0.05))
             for n, p in params.items() if n not in (masked, pruned)}
    diffs = {"add": added, "mask": {masked: mask}, "sparse": {pruned: sparse},
             "mixed": {**added, masked: mask, pruned: sparse}}[kind]
    return TaskPatch({n: d for n, d in diffs.items() if d.nnz}, head, meta)


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, data: bytes, **dump) -> bytes:
    text = json.dumps(header, **dump).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    return len(text).to_bytes(8, "little") + text + data


def _regions(raw: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges in the file: the header, and the data of positions, values and the head."""
    header, _ = _split(raw)
    start = len(raw) - len(_split(raw)[1])
    spans = {k: (start + v["data_offsets"][0], start + v["data_offsets"][1]) for k, v in header.items()
             if k != "__metadata__"}
    heads = [s for k, s in spans.items() if k.startswith("head.")]
    return {"header": (8, start), "positions": spans["positions"], "values": spans["values"],
            "head": (min(a for a, _ in heads), max(b for _, b in heads)), "anywhere": (0, len(raw))}


def _flips(raw: bytes, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    damaged = []
    for region, (lo, hi) in _regions(raw).items():
        for _ in range(FLIPS_PER_REGION if hi > lo else 0):
            data = bytearray(raw)
            at = int(rng.integers(lo, hi))
            data[at] ^= int(rng.integers(1, 256))
            damaged.append((f"flip {region} @{at}", bytes(data)))
    return damaged


def _truncations(raw: bytes, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    ends = {0, 7, 8, len(raw) - 1, *(int(e) for e in rng.integers(9, len(raw) - 1, TRUNCATIONS))}
    return [(f"truncated at {e}", raw[:e]) for e in sorted(ends)]


def _header_edits(raw: bytes, base) -> list[tuple[str, dict]]:
    """Edits of the header JSON, as someone (or something) rewriting it would make."""
    header, _ = _split(raw)
    md = header["__metadata__"]
    table = json.loads(md["tensors"])
    heads = sorted(k for k in header if k.startswith("head."))
    frozen = next(n for n in base.base_names if n not in {r[0] for r in table})
    edits = []

    def edit(name, fn):
        h = json.loads(json.dumps(header))
        fn(h)
        edits.append((name, h))

    def set_table(h, rows):
        h["__metadata__"]["tensors"] = json.dumps(rows)

    if len(table) > 1:
        edit("rows swapped", lambda h: set_table(h, [table[1], table[0], *table[2:]]))
        edit("names swapped", lambda h: set_table(h, [[table[1][0], *table[0][1:]], [table[0][0], *table[1][1:]],
                                                      *table[2:]]))
    for dtype in ("F32", "F16", "BF16"):
        if dtype != header["values"]["dtype"]:
            edit(f"values dtype {dtype}", lambda h, d=dtype: h["values"].update(dtype=d))
    edit("head removed", lambda h: h.pop(heads[0]))
    edit("head renamed to a base parameter", lambda h: h.update({f"head.{frozen}": h.pop(heads[-1])}))
    edit("head shape changed", lambda h: h[heads[0]].update(shape=_reshaped(h[heads[0]]["shape"])))
    edit("row shape changed", lambda h: set_table(h, [[table[0][0], _reshaped(table[0][1]), *table[0][2:]],
                                                      *table[1:]]))
    for kind in ("add", "mask", "sparse", "mixed-up"):
        if kind != table[0][6]:
            edit(f"kind {kind}", lambda h, k=kind: set_table(h, [[*table[0][:6], k], *table[1:]]))
    other = next(d for d in ("float16", "bfloat16") if d != md["value_dtype"])
    edit("value dtype recorded", lambda h: h["__metadata__"].update(value_dtype=other))
    edit("meta changed", lambda h: h["__metadata__"].update(meta=md["meta"].replace('"toy"', '"RTE"')))
    edit("digest removed", lambda h: h["__metadata__"].pop("digest"))
    edit("version 1", lambda h: h["__metadata__"].update(format_version="1"))
    return edits


def _reshaped(shape: list[int]) -> list[int]:
    """Another shape of as many entries: flattened, or a leading 1 for a vector."""
    return [int(np.prod(shape))] if len(shape) > 1 else [1, *shape]


def _redigested(header: dict, data: bytes, scratch) -> bytes | None:
    """The edit with its digest recomputed (a writer that trusts whatever it was handed), or None
    where safetensors itself cannot read the edited header."""
    from safetensors import safe_open

    path = scratch / "redigest.safetensors"
    path.write_bytes(_join(header, data))
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None
    md = header["__metadata__"]
    return _join({**header, "__metadata__": {**md, "digest": digest(md, tensors)}}, data)


def _outcome(raw: bytes, base, expected: dict, path) -> str:
    """'refused' or 'same'; anything else (another exception, a changed model) fails the test."""
    path.write_bytes(raw)
    try:
        patch = TaskPatch.load(path)
        applied = patch.apply(base)
    except DiffpruneError as e:
        assert "\n" not in str(e)
        return "refused"
    state = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    applied.revert()
    changed = [n for n in expected if not torch.equal(state[n], expected[n])]
    assert not changed, f"a damaged file loaded and changed {changed[:3]}"
    return "same"


@pytest.mark.parametrize("kind,value_dtype", [("add", "float16"), ("mask", "float32"), ("sparse", "bfloat16"),
                                              ("mixed", "float16")])
def test_damaged_patches_are_refused_or_harmless(base, tmp_path, kind, value_dtype):
    rng = np.random.default_rng([SEED, len(kind)])
    good = tmp_path / "good.safetensors"
    _patch(base, kind).save(good, value_dtype=value_dtype)
    raw = good.read_bytes()
    original = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    with TaskPatch.load(good).apply(base):
        expected = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    assert any(not torch.equal(original[n], expected[n]) for n in base.base_names)  # the patch does change the base

    header, data = _split(raw)
    edits = _header_edits(raw, base)
    cases = [*_flips(raw, rng), *_truncations(raw, rng), *((n, _join(h, data)) for n, h in edits)]
    assert len(cases) > 70
    for name, case in cases:
        if _outcome(case, base, expected, tmp_path / "damaged.safetensors") == "same":
            # Only bytes that do not matter may change and still load: a flip in the header's
            # padding or whitespace that leaves the same JSON, and the same data.
            assert _split(case) == (header, data), name

    # Whitespace in the header does not matter: the same patch, byte for byte where it counts.
    for spaced in (_join(header, data, indent=2), _join(header, data, separators=(", ", ": "))):
        assert _outcome(spaced, base, expected, tmp_path / "spaced.safetensors") == "same"

    # With the digest recomputed, the edits that break the file's structure are still refused,
    # by the checks behind the digest (dtype against value_dtype, the table, the model's head).
    must_fail = ("rows swapped", "values dtype", "head removed", "head renamed", "head shape", "row shape",
                 "kind mixed-up", "value dtype recorded")
    for name, edited in edits:
        redone = _redigested(edited, data, tmp_path)
        if redone is not None and name.startswith(must_fail):
            assert _outcome(redone, base, expected, tmp_path / "redigested.safetensors") == "refused", name

    after = {n: p.detach() for n, p in base.model.named_parameters()}
    assert all(torch.equal(original[n], after[n]) for n in original)  # every refusal left the model as it was
