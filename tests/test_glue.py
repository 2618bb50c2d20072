"""GLUE package, from the files' side: the task table, reading GLUE folders and the hub, HF conversion."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from diffprune.errors import DiffpruneError
from diffprune.glue import (
    TASKS,
    Example,
    examples_from_hf,
    get_task,
    load_hub_split,
    load_split,
    read_glue_split,
    resolve_data_dir,
    resolve_split,
)




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
