"""benchmarks/sparse_speed.py on a tiny BERT: every engine gives the dense outputs, the records
carry what the table and the goals read, and the generated section replaces itself."""

import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import sparse_speed  # noqa: E402
import sparse_table  # noqa: E402


@pytest.fixture()
def pruned_tiny(tiny_model):
    from diffprune.base import load_base

    model = load_base(tiny_model).model.eval()
    sparse_speed.prune_by_magnitude(model, 0.9)
    return model


def test_pruning_is_per_matrix_and_exact(pruned_tiny):
    assert sparse_speed.encoder_sparsity(pruned_tiny) == pytest.approx(0.9, abs=1e-3)
    w = pruned_tiny.bert.encoder.layer[0].attention.self.query.weight
    assert int((w != 0).sum()) == round(0.1 * w.numel())


def test_a_record_of_every_engine(pruned_tiny, tmp_path):
    engines = ["eager", "csr", "onnxruntime", "diffprune"]  # onnxruntime: in the test extra
    args = Namespace(engines=engines, threads=[1], batch_sizes=[2], lengths=[8], repeats=2, warmup_rounds=1)
    records = sparse_speed.measure("tiny", 0.9, pruned_tiny, args, tmp_path)
    (r,) = records
    assert set(r["ms"]) == set(engines) and all(v > 0 for v in r["ms"].values())
    assert all(d <= 1e-4 for d in r["max_abs_diff"].values()), r["max_abs_diff"]
    assert r["weight_bytes"]["eager"] == r["dense_fp32_weight_bytes"]
    assert r["version"] and len(r["load_avg_start"]) == 3 and r["options"]["engines"] == engines
    assert r["fused_layers"] in (0, 2) and r["options"]["block"] > r["options"]["settle"]  # fused where faster

    r["model"] = "all-MiniLM-L6-v2 (magnitude)"
    r["sparsity"], r["batch_size"], r["length"], r["threads"] = 0.95, 1, 128, 2
    text = sparse_table.with_section("# Benchmarks\n\nother text\n", records)
    assert text.count("## Sparse inference on the CPU") == 1 and "other text" in text
    assert "| 95% | ≥ 3.5x | 2 |" in text and "Weights at 95%" in text
    again = sparse_table.with_section(text, records + [dict(r, ms={**r["ms"], "diffprune": 1e-3})])
    assert again.count("## Sparse inference on the CPU") == 1 and again.count("| 95% | ≥ 3.5x | 2 |") == 1


def test_csr_engine_equals_dense(pruned_tiny):
    csr, stored = sparse_speed.csr_model(pruned_tiny)
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        a = pruned_tiny(input_ids=ids).logits
        b = csr(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4 and stored > 0
