"""Two CPU processes (gloo) train the same model as one process: same global batches, same result."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import GLUE_FIXTURES

pytestmark = pytest.mark.distributed


def train_args(model: str, output: Path) -> list[str]:
    # 22 examples in global batches of 7, 4 steps an epoch: the processes get 4 and 3 of each full
    # batch (uneven shares, so the losses must be weighted) and 1 and 0 of the last (the empty
    # share must still take part in the backward)
    return ["train", "--task", "MRPC", "--method", "full", "--model", model, "--data-dir", str(GLUE_FIXTURES),
            "--max-train-samples", "22", "--batch-size", "7", "--epochs", "2", "--lr", "1e-3",
            "--max-seq-length", "64", "--checkpoint-every", "2", "--log-every", "1", "--seed", "3",
            "--output", str(output)]


def losses(run: Path) -> dict[int, float]:
    with open(run / "log.csv", newline="") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "loss"}


def launch_two(args: list[str], log_path: Path, meanwhile=lambda: None) -> str:
    """Runs `diffprune ARGS` in two processes (torchrun, gloo) and `meanwhile()` in this one;
    returns the launcher's output, asserting that it succeeded."""
    # `accelerate launch --cpu` starts a single process unless MPI is configured; torchrun starts
    # two, and Accelerate joins them into a gloo group on a machine without an accelerator.
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "diffprune", *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:  # its own session: a hang is killed with its workers
        proc = subprocess.Popen(launch, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            meanwhile()
            code = proc.wait(timeout=300)  # a hang fails here instead of blocking the suite
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log_path.read_text()
    assert code == 0, output[-4000:]
    assert output.count("run written to") == 1  # one summary, from the main process
    return output


def test_two_processes_match_one(tiny_model_no_dropout, tmp_path, one_thread):
    from diffprune.cli import main

    two, one = tmp_path / "two", tmp_path / "one"
    launch_two(train_args(tiny_model_no_dropout, two), tmp_path / "two.log",
               meanwhile=lambda: main(train_args(tiny_model_no_dropout, one), standalone_mode=False))

    r1 = json.loads((one / "run.json").read_text())
    r2 = json.loads((two / "run.json").read_text())
    assert r1["num_processes"] == 1 and r2["num_processes"] == 2
    assert r1["steps"] == r2["steps"] == 8 and r2["train_examples"] == 22
    assert r2["score"] == r1["score"] and r2["dev"] == pytest.approx(r1["dev"])
    assert [e["score"] for e in r2["evals"]] == [e["score"] for e in r1["evals"]]

    w1 = load_file(one / "model" / "model.safetensors")
    w2 = load_file(two / "model" / "model.safetensors")
    start = load_file(Path(tiny_model_no_dropout) / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), k
    moved = max((w1[k] - start[k]).abs().max().item() for k in start if k in w1)
    assert moved > 1e-3  # the runs really trained, so the match is not trivial

    l1, l2 = losses(one), losses(two)  # the loss is averaged over the processes
    assert l1.keys() == l2.keys() == set(range(1, 9))
    assert all(l2[s] == pytest.approx(l1[s], rel=1e-5) for s in l1)
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1  # only the main writes


def test_diff_pruning_on_two_processes_keeps_one_patch(tiny_model_no_dropout, tmp_path, one_thread):
    """Each phase trains other tensors (w and the gates, then the k values) and each process
    draws its own gate sample for the projection: the processes must still end with one model,
    the one the patch holds. DDP does not broadcast buffers: the controller's state (lambda,
    the lookahead's logit average) must come out the same on each process by itself."""
    from diffprune.api import evaluate_patch

    run = tmp_path / "two"
    args = train_args(tiny_model_no_dropout, run)
    args[args.index("full")] = "diff-struct"
    launch_two([*args, "--budget", "0.01", "--patch-dtype", "float32", "--controller-lookahead", "2"],
               tmp_path / "two.log")
    record = json.loads((run / "run.json").read_text())
    assert record["num_processes"] == 2 and record["steps"] == 16  # 2 epochs per phase, 4 steps each

    # one process scores the patch as the two did: the same model, whichever process saved it
    # (the patch records the run's --max-seq-length 64, so eval truncates the same way)
    reevaluated = evaluate_patch(run / "patch.safetensors", data_dir=str(GLUE_FIXTURES), model=tiny_model_no_dropout)
    assert reevaluated == pytest.approx(record["dev"], abs=1e-6)


def test_a_dev_set_smaller_than_the_processes_does_not_hang(tiny_model_no_dropout, tmp_path, one_thread):
    """One dev example for two processes: one of them evaluates nothing, and must still finish."""
    run = tmp_path / "two"
    args = train_args(tiny_model_no_dropout, run)
    for flag, value in (("--max-train-samples", "4"), ("--batch-size", "4"), ("--epochs", "1")):
        args[args.index(flag) + 1] = value
    output = launch_two([*args, "--max-eval-samples", "1"], tmp_path / "two.log")
    record = json.loads((run / "run.json").read_text())
    assert record["num_processes"] == 2 and record["steps"] == 1 and len(record["evals"]) == 1
    assert output.count("epoch 1.00: dev") == 1  # printed by the main process only
