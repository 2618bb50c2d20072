"""The command line as a user meets it.

Every `python -m diffprune` process spends seconds importing torch and transformers, so the
real processes are kept to those where the process matters (an error's exit status and
stderr, a real training run, a real prediction) and run side by side; the rest of the
surface goes through the same click commands in this process with click's runner, which
separates stdout from stderr and turns `sys.exit` into an exit code the same way.
"""

from __future__ import annotations

import csv
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from conftest import GLUE_FIXTURES, run_cli
from diffprune.cli import main

GLUE = str(GLUE_FIXTURES)


def run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run `python -m diffprune ARGS` for each entry at the same time."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        futures = {name: pool.submit(run_cli, *args, timeout=240, OMP_NUM_THREADS="1")
                   for name, args in commands.items()}
        return {name: f.result() for name, f in futures.items()}


def invoke(*args: str) -> Result:
    """The same command in this process."""
    return CliRunner().invoke(main, list(args), prog_name="diffprune")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def processes(work, tiny_model) -> dict[str, subprocess.CompletedProcess]:
    """Real processes: a training run driven by --config (a flag overriding it) with an input
    error beside it; then, with the run finished, a prediction from it."""
    config = work / "settings.json"
    config.write_text(json.dumps({"lr": 3e-4, "epochs": 3, "batch-size": 8, "max_train_samples": 8,
                                  "max_seq_length": 64, "seed": 5}))
    results = run_all({
        "train": ["train", "--config", str(config), "--epochs", "1", "--model", tiny_model, "--data-dir", GLUE,
                  "--output", str(work / "run")],
        "bad_task": ["train", "--task", "NOPE", "--model", tiny_model, "--data-dir", GLUE,
                     "--output", str(work / "bad-task")],
    })
    assert results["train"].returncode == 0, results["train"].stderr[-3000:]
    results.update(run_all({
        "predict": ["predict", "--run", str(work / "run"), "--data-dir", GLUE, "--output", str(work / "submission")],
    }))
    return results


def one_line_error(returncode: int, stderr: str) -> str:
    assert returncode == 1, (returncode, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def invoked_error(result: Result) -> str:
    assert isinstance(result.exception, SystemExit), result.exception  # not an escaped exception
    return one_line_error(result.exit_code, result.stderr)


# ---- help and listings ----------------------------------------------------------------------


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for command in ("train", "eval", "predict", "methods", "patch"):
        assert f"  {command} " in result.stdout, command


def test_train_help_documents_the_options():
    result = invoke("train", "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # click wraps long help lines
    for option, words in [
        ("--lr", "Peak learning rate"),
        ("--lora-r", "LoRA rank"),
        ("--resume", "Continue the interrupted run"),
        ("--config", "JSON or TOML file of settings"),
        ("--overwrite", "Replace a previous run"),
        ("--batch-size", "Global batch size"),
    ]:
        assert f"{option} " in text and words in text, option
    assert "[default: 32]" in text  # defaults are shown where there is one


def test_methods_lists_the_methods():
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert {"full", "bitfit", "lora"} <= rows.keys()
    assert "--lora-r" in rows["lora"] and "no options" in rows["full"]
    # --lr's help sends the reader here for each method's own rate
    assert "(default --lr 5e-05)" in rows["full"] and "(default --lr 0.0001)" in rows["diff-struct"]
    assert "(default --lr 0.001)" in rows["bitfit"]


# ---- input errors: exit 1 and one line, never a traceback -----------------------------------


def test_unknown_task(processes):
    line = one_line_error(processes["bad_task"].returncode, processes["bad_task"].stderr)
    assert "NOPE" in line and "MRPC" in line  # names the task and the choices


def test_unknown_method(work):
    line = invoked_error(invoke("train", "--method", "magic", "--data-dir", GLUE, "--output", str(work / "m")))
    assert "magic" in line and "full" in line and "lora" in line


def test_unknown_option():
    result = invoke("train", "--learning-speed", "3")
    assert result.exit_code not in (0, 1) and isinstance(result.exception, SystemExit)  # click's usage error
    assert "--learning-speed" in result.stderr and "Traceback" not in result.stderr


def test_missing_model_folder(work):
    missing = work / "no-such-model"
    line = invoked_error(invoke("train", "--model", str(missing), "--data-dir", GLUE, "--output", str(work / "mm")))
    assert str(missing) in line and "does not exist" in line


def test_glue_folder_without_the_task(work, tiny_model):
    (work / "empty-glue").mkdir()
    line = invoked_error(invoke("train", "--model", tiny_model, "--data-dir", str(work / "empty-glue"),
                                "--output", str(work / "no-task-data")))
    assert "MRPC" in line and str(work / "empty-glue") in line


def test_bad_config_file(work):
    (work / "broken.json").write_text("{lr: 1")
    line = invoked_error(invoke("train", "--config", str(work / "broken.json"), "--output", str(work / "bc")))
    assert "broken.json" in line and "not valid JSON" in line
    (work / "typo.json").write_text(json.dumps({"learning_rate": 1e-3}))
    line = invoked_error(invoke("train", "--config", str(work / "typo.json"), "--output", str(work / "bc")))
    assert "learning_rate" in line
    (work / "types.toml").write_text('epochs = "3"\n')  # a string where a number belongs
    line = invoked_error(invoke("train", "--config", str(work / "types.toml"), "--output", str(work / "bc")))
    assert "epochs" in line and "'3'" in line
    (work / "option-types.toml").write_text('method = "diff"\nalpha_lr = "fast"\n')
    line = invoked_error(invoke("train", "--config", str(work / "option-types.toml"), "--output", str(work / "bc")))
    assert "alpha_lr" in line and "'fast'" in line
    assert not (work / "bc").exists()  # nothing was claimed


def test_bad_numbers_in_flags_are_one_line_errors(work):
    for flags, expected in [(["--budget", "nan"], "'budget' must be a finite number"),
                            (["--lr", "inf"], "'lr' must be a finite number"),
                            (["--gate-l", "0.5"], "--gate-l")]:
        line = invoked_error(invoke("train", "--method", "diff", *flags, "--output", str(work / "bn")))
        assert expected in line, line
    assert not (work / "bn").exists()
    result = invoke("eval", "--run", str(work / "bn"), "--batch-size", "0")  # click's own usage error
    assert result.exit_code == 2 and "--batch-size" in result.stderr and "Traceback" not in result.stderr


# ---- a real run and what one does with it ---------------------------------------------------


def test_config_file_with_a_flag_overriding_it(processes, work):
    result = processes["train"]
    assert "dev f1:" in result.stdout and str(work / "run") in result.stdout
    record = json.loads((work / "run" / "run.json").read_text())
    # all 30 dev rows, 19 of them paraphrases: "paraphrase" throughout has F1 2 * 19 / (19 + 30)
    assert record["majority_class"]["score"] == pytest.approx(38 / 49)
    assert "against 0.7755 for always answering the majority class" in result.stdout
    saved = json.loads((work / "run" / "settings.json").read_text())
    assert saved["epochs"] == 1.0  # the flag wins
    assert saved["lr"] == 3e-4 and saved["batch_size"] == 8 and saved["seed"] == 5  # the config's
    record = json.loads((work / "run" / "run.json").read_text())
    assert record["settings"]["epochs"] == 1.0 and record["settings"]["lr"] == 3e-4
    assert record["steps"] == 1 and len(record["evals"]) == 1


def test_second_train_into_the_same_output_is_refused(processes, work, tiny_model):
    run = work / "run"
    line = invoked_error(invoke("train", "--model", tiny_model, "--data-dir", GLUE, "--max-steps", "1",
                                "--output", str(run)))
    assert "--overwrite" in line and str(run) in line
    assert json.loads((run / "run.json").read_text())["settings"]["seed"] == 5  # untouched


def test_eval_prints_the_metrics(processes, work):
    record = json.loads((work / "run" / "run.json").read_text())  # the run scored all 30 dev rows
    result = invoke("eval", "--run", str(work / "run"), "--data-dir", GLUE)
    assert result.exit_code == 0, result.output
    words = result.stdout.split()
    assert words[0::2] == ["f1", "accuracy", "score"]
    assert float(words[words.index("score") + 1]) == pytest.approx(record["score"], abs=1e-4)
    as_json = invoke("eval", "--run", str(work / "run"), "--data-dir", GLUE, "--json")
    assert json.loads(as_json.stdout) == pytest.approx(record["dev"], abs=1e-6)


def test_eval_needs_a_run_or_a_patch():
    line = invoked_error(invoke("eval", "--data-dir", GLUE))
    assert "--run" in line and "--patch" in line


def test_predict_writes_a_submission(processes, work):
    result = processes["predict"]
    assert result.returncode == 0, result.stderr[-3000:]
    path = work / "submission" / "MRPC.tsv"
    assert str(path) in result.stdout
    with open(GLUE_FIXTURES / "MRPC" / "test.tsv", newline="", encoding="utf-8-sig") as f:
        test_ids = [row["index"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    lines = path.read_text().splitlines()
    assert lines[0] == "index\tprediction"
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == len(test_ids) == 30
    assert [r[0] for r in rows] == test_ids
    assert {r[1] for r in rows} <= {"0", "1"}


def test_predict_refuses_to_overwrite_a_submission(processes, work):
    path = work / "submission" / "MRPC.tsv"
    before = path.read_text()
    line = invoked_error(invoke("predict", "--run", str(work / "run"), "--output", str(work / "submission")))
    assert line == f"error: {path} already exists; pass --overwrite to replace it"
    assert path.read_text() == before
    # --overwrite replaces it; the data folder is the one the run read, without --data-dir
    result = invoke("predict", "--run", str(work / "run"), "--output", str(work / "submission"), "--overwrite")
    assert result.exit_code == 0, result.output
    assert path.read_text() == before  # the same run's predictions


def test_eval_of_a_run_needs_no_data_dir(processes, work, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    record = json.loads((work / "run" / "run.json").read_text())
    result = invoke("eval", "--run", str(work / "run"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == pytest.approx(record["dev"], abs=1e-6)


def test_eval_of_a_patch_on_another_task_warns_and_scores(work, tiny_model):
    from diffprune.api import train
    from diffprune.training.settings import TrainSettings

    run = work / "patch-run"
    train(TrainSettings(task="MRPC", method="diff-struct", model=tiny_model, data_dir=GLUE, output=str(run),
                        max_steps=1, batch_size=8, max_seq_length=64, max_train_samples=8))
    result = invoke("eval", "--patch", str(run / "patch.safetensors"), "--task", "RTE", "--data-dir", GLUE)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == "warning: the patch was trained on MRPC, not RTE; scoring it on RTE anyway"
    assert result.stdout.split()[0::2] == ["accuracy", "score"]  # RTE's metric
    same = invoke("eval", "--patch", str(run / "patch.safetensors"), "--task", "mrpc", "--data-dir", GLUE)
    assert same.exit_code == 0 and "warning" not in same.stderr  # its own task, in another spelling
