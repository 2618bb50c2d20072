"""The real thing: a training process killed with SIGKILL and resumed reproduces, bit for bit,
the run that was never interrupted (dropout on, so the RNG restore is exercised too)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import GLUE_FIXTURES

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def train_args(model: str, output: Path, *extra: str) -> list[str]:
    return [
        "train", "--task", "MRPC", "--method", "full", "--model", model, "--data-dir", str(GLUE_FIXTURES),
        "--epochs", "3", "--batch-size", "4", "--checkpoint-every", "2", "--log-every", "1",
        "--max-seq-length", "64", "--max-eval-samples", "16", "--seed", "11", "--output", str(output), *extra,
    ]


def command(model: str, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "diffprune", *train_args(model, output, *extra)]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe: tqdm's output must never block the process
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:  # hung: do not leave it running
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()[-3000:]


def checkpoint_step(latest: Path) -> int:
    try:
        return int(latest.read_text().strip().removeprefix("step-"))
    except (OSError, ValueError):
        return 0


def log_rows(run: Path) -> list[tuple[str, str, str, str]]:
    with open(run / "log.csv", newline="") as f:
        return [(r["step"], r["phase"], r["name"], r["value"]) for r in csv.DictReader(f)]


def tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()  # also applies the purge a resumed writer records
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_model, tmp_path, one_thread):
    from diffprune.cli import main

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    victim = start(command(tiny_model, killed), tmp_path / "killed.log")

    # Kill it once a checkpoint past the first epoch (8 steps) exists, so that the resumed run
    # must also restore the evaluations and the best-so-far snapshot, not only the weights.
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    try:
        while victim.poll() is None and time.monotonic() < deadline and checkpoint_step(latest) < 10:
            time.sleep(0.005)
    finally:
        if victim.poll() is None:
            os.kill(victim.pid, signal.SIGKILL)
        code = victim.wait(timeout=60)
    assert latest.exists(), "no checkpoint appeared: " + (tmp_path / "killed.log").read_text()[-3000:]
    assert code in (-signal.SIGKILL, 0), (tmp_path / "killed.log").read_text()[-3000:]
    step = json.loads((killed / "checkpoints" / latest.read_text().strip() / "progress.json").read_text())
    if code == -signal.SIGKILL and not (killed / "run.json").exists():  # killed mid-run
        assert 10 <= step["global_step"] <= 24 and len(step["evals"]) >= 1, step
        assert step["best_step"] is not None and (killed / "checkpoints" / f"step-{step['global_step']}"
                                                  / "best.safetensors").exists()

    resumed = start(command(tiny_model, killed, "--resume"), tmp_path / "resumed.log")
    try:  # meanwhile, the uninterrupted run: the same command, in this process
        main(train_args(tiny_model, whole), standalone_mode=False)
    finally:
        finish(resumed, tmp_path / "resumed.log")

    a = json.loads((killed / "run.json").read_text())
    b = json.loads((whole / "run.json").read_text())
    assert a["steps"] == b["steps"] == 24
    assert a["score"] == b["score"] and a["dev"] == b["dev"]
    assert a["evals"] == b["evals"] and len(a["evals"]) == 3

    wa = load_file(killed / "model" / "model.safetensors")
    wb = load_file(whole / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"resumed weights differ in {different[:5]} (checkpoint at step {step['global_step']})"

    # the saved model may be an earlier epoch's (keep-best); the last checkpoint holds the
    # weights after the final step, which depend on every step after the resume
    last = [load_file(run / "checkpoints" / "step-24" / "trainable.safetensors") for run in (killed, whole)]
    assert last[0].keys() == last[1].keys() == wa.keys()
    assert all(torch.equal(last[0][k], last[1][k]) for k in last[0])

    # the log is rewound to the checkpoint and continued: the same rows as the whole run
    assert log_rows(killed) == log_rows(whole)
    for tag in ("finetune/loss", "finetune/dev_score"):  # and so is TensorBoard's
        assert tensorboard_scalars(killed, tag) == tensorboard_scalars(whole, tag), tag
