"""The command line around patches, run as a user would (fresh processes), on one training."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import GLUE_FIXTURES, run_cli, tiny_bert
from diffprune.base import load_base
from diffprune.patch import SparseDiff, TaskPatch
from diffprune.patch.ops import base_for

GLUE = str(GLUE_FIXTURES)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*args: str):
    # One thread: the model is tiny, and more threads only fight other jobs for the cores.
    return run_cli(*args, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = cli("train", "--task", "MRPC", "--method", "diff-struct", "--budget", "0.01", "--model", tiny_model,
                 "--data-dir", GLUE, "--output", str(out), "--epochs", "1", "--batch-size", "8",
                 "--max-train-samples", "24")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    return out, result, record


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory) -> str:
    """The same architecture with other initial weights, hence another fingerprint."""
    return str(tiny_bert(tmp_path_factory.mktemp("other-tiny"), initializer_range=0.05))


@pytest.fixture(scope="module")
def commands(trained, other_tiny, tmp_path_factory):
    """Every command under test, run once each, concurrently (they are independent and mostly
    spend their time importing): name -> (CompletedProcess, paths they use)."""
    out, _, _ = trained
    work = tmp_path_factory.mktemp("commands")
    first = out / "patch.safetensors"
    # A truncated copy of the patch.
    data = first.read_bytes()
    truncated = work / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    # A second patch on the same base, of other kinds: the first one's layer-0 positions switched
    # off, and its pooler kept as a sparse tensor, as another "method".
    patch = TaskPatch.load(first)
    kept = {n: SparseDiff(d.shape, d.positions, kind="mask") for n, d in patch.diffs.items() if ".layer.0." in n}
    assert kept and len(kept) < len(patch.diffs)
    kept["bert.pooler.dense.bias"] = SparseDiff.from_sparse(torch.arange(32.0))
    second = work / "layer0.safetensors"
    TaskPatch(kept, patch.head, {**patch.meta, "method": "layer-0 masked"}).save(second)
    paths = {"patch": first, "truncated": truncated, "second": second, "exported": work / "exported",
             "applied": work / "applied", "png": work / "plots" / "where.png"}
    args = {
        "info_json": ("patch", "info", "--json", str(first)),
        "info_text": ("patch", "info", str(first)),
        "info_kinds": ("patch", "info", str(second)),
        "eval": ("eval", "--patch", str(first), "--data-dir", GLUE),
        "export": ("patch", "export", str(first), "--output", str(paths["exported"])),
        "apply_other": ("patch", "apply", str(first), "--base", other_tiny, "--output", str(paths["applied"])),
        "truncated": ("patch", "info", str(truncated)),
        "plot": ("patch", "plot", str(first), str(second), "--output", str(paths["png"])),
        "plot_no_suffix": ("patch", "plot", str(first), "--output", str(work / "plots" / "bare")),
        "plot_bad_suffix": ("patch", "plot", str(first), "--output", str(work / "plots" / "x.pdfx")),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(cli, *a) for name, a in args.items()}
        results = {name: f.result() for name, f in futures.items()}
    return results, paths


def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _one_line_error(result) -> str:
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    return lines[0]


def test_train_writes_patch_and_prints_score(trained):
    out, result, record = trained
    path = out / "patch.safetensors"
    assert path.is_file() and path.stat().st_size == record["patch_bytes"]
    assert record["method"] == "diff-struct" and record["k"] == round(0.01 * record["base_params"])
    assert 0.99 * record["k"] < record["nnz"] <= record["k"]  # fp16 stores a value below 6e-8 as no change
    assert f"dev f1: {record['score']:.4f}" in result.stdout
    assert f"patch written to {path}" in result.stdout
    assert f"{record['nnz']:,} changed entries" in result.stdout


def test_patch_info_json(trained, commands):
    out, _, record = trained
    path = out / "patch.safetensors"
    info = json.loads(_ok(commands[0]["info_json"]).stdout)
    assert info["nnz"] == record["nnz"] == TaskPatch.load(path).nnz
    assert info["base_params"] == record["base_params"] == 1_000_096
    assert info["bytes"] == path.stat().st_size
    assert info["fingerprint"] == record["fingerprint"]
    assert info["method"] == "diff-struct" and info["task"] == "MRPC"
    assert info["value_dtype"] == "float16"
    assert sum(t["nnz"] for t in info["tensors"]) == record["nnz"]
    # everything eval needs to score it as trained, and the method's options
    assert info["max_seq_length"] == record["settings"]["max_seq_length"]
    assert info["problem_type"] == "single_label_classification"
    assert info["config"]["budget"] == 0.01


def test_patch_info_text(trained, commands):
    _, _, record = trained
    stdout = _ok(commands[0]["info_text"]).stdout
    assert "diff-struct patch for MRPC" in stdout
    assert record["fingerprint"] in stdout
    assert f"{record['nnz']:,} changed entries of {record['base_params']:,}" in stdout


def test_patch_info_counts_each_kind(commands):
    results, paths = commands
    stdout = _ok(results["info_kinds"]).stdout
    patch = TaskPatch.load(paths["second"])
    masked = [d for d in patch.diffs.values() if d.kind == "mask"]
    counts = f"mask: {sum(d.nnz for d in masked):,} entries switched off in {len(masked)} tensors"
    assert f"  by kind: {counts}; sparse: 31 entries kept (the rest of the tensor zero) in 1 tensor\n" in stdout
    assert "by kind: add: " in _ok(results["info_text"]).stdout


def test_eval_patch_prints_the_run_score(trained, commands):
    _, _, record = trained
    stdout = _ok(commands[0]["eval"]).stdout
    printed = {k: float(v) for k, v in re.findall(r"(\w+) (\d+\.\d+)", stdout)}
    assert printed == {k: round(v, 4) for k, v in record["dev"].items()}
    assert f"score {record['score']:.4f}" in stdout


def test_export_loads_with_transformers(commands, tiny_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    results, paths = commands
    exported = paths["exported"]
    assert str(exported) in _ok(results["export"]).stdout
    model = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    inputs = tokenizer(["The cat sat on the mat.", "Stocks fell sharply on Monday after the report."],
                       ["A cat was sitting on a mat.", "The report came out on Monday."],
                       padding=True, return_tensors="pt")
    patch = TaskPatch.load(paths["patch"])
    base = base_for(patch, tiny_model)
    with torch.no_grad():
        unpatched = base.model.eval()(**inputs).logits
        with patch.apply(base):
            expected = base.model(**inputs).logits
        exported_logits = model(**inputs).logits
    torch.testing.assert_close(exported_logits, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(unpatched, expected, rtol=0, atol=1e-6)
    assert model.config.id2label == {0: "0", 1: "1"}


def test_apply_onto_another_base_fails_naming_both_fingerprints(trained, commands, other_tiny):
    _, _, record = trained
    results, paths = commands
    other = load_base(other_tiny).fingerprint
    assert other != record["fingerprint"]
    line = _one_line_error(results["apply_other"])
    assert record["fingerprint"] in line and other in line
    assert not paths["applied"].exists()


def test_a_patch_whose_base_folder_moved_names_it_and_takes_another(trained, tmp_path, tiny_model):
    from diffprune.errors import DiffpruneError

    patch = TaskPatch.load(trained[0] / "patch.safetensors")
    assert patch.meta["base"] == str(Path(tiny_model).resolve())
    moved = TaskPatch(patch.diffs, patch.head, {**patch.meta, "base": str(tmp_path / "gone")})
    with pytest.raises(DiffpruneError, match=r"gone', which is not here; pass --base"):
        base_for(moved)
    assert base_for(moved, tiny_model).fingerprint == patch.meta["fingerprint"]


def test_truncated_patch_is_a_one_line_error(commands):
    results, paths = commands
    line = _one_line_error(results["truncated"])
    assert str(paths["truncated"]) in line and "not a valid diffprune patch" in line


def test_plot_two_patches(commands):
    results, paths = commands
    assert str(paths["png"]) in _ok(results["plot"]).stdout
    data = Path(paths["png"]).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_plot_adds_png_to_a_bare_name_and_refuses_a_format_it_cannot_write(commands):
    results, paths = commands
    bare = paths["png"].parent / "bare.png"
    assert _ok(results["plot_no_suffix"]).stdout.strip() == f"wrote {bare}"
    assert bare.read_bytes()[:8] == PNG_MAGIC
    line = _one_line_error(results["plot_bad_suffix"])
    assert "cannot write a plot as '.pdfx'" in line and ".png" in line
    assert not (paths["png"].parent / "x.pdfx").exists()
