"""A run that goes wrong leaves nothing poisoned and says what happened in one line: a
divergence names its step and the last finite checkpoint, and an output the run cannot write
is refused before the model loads (or, when the disk fills later, at the write that failed)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from diffprune.api import train
from diffprune.errors import DiffpruneError, TrainingDiverged
from diffprune.training.settings import TrainSettings


def settings(model: str, glue_dir: str, output: Path, **overrides) -> TrainSettings:
    values = dict(task="MRPC", method="full", model=model, data_dir=glue_dir, output=str(output), seed=3,
                  epochs=1, batch_size=8, max_seq_length=64, max_train_samples=16, max_eval_samples=16,
                  checkpoint_every=0, log_every=1)
    values.update(overrides)
    return TrainSettings(**values)


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def all_finite(folder: Path) -> bool:
    files = [folder / "trainable.safetensors", folder / "best.safetensors"]
    tensors = [t for f in files if f.exists() for t in load_file(f).values()]
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ---- divergence ------------------------------------------------------------------------------


def test_a_learning_rate_beyond_float32_stops_at_its_first_step_with_no_checkpoint(tiny_model, glue_dir, tmp_path):
    """1e39 is inf in float32: the loss and the gradients of step 1 are finite, its update is not."""
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as excinfo:
        train(settings(tiny_model, glue_dir, out, lr=1e39))
    message = str(excinfo.value)
    assert "at step 1 (phase finetune)" in message and "no checkpoint was written" in message
    assert "\n" not in message
    assert checkpoints(out) == [] and not (out / "run.json").exists()


def test_a_fixed_mask_phase_that_diverges_names_the_last_finite_checkpoint(tiny_model, glue_dir, tmp_path):
    """--fixed-lr 1e39 used to go unreported: the one fixed-mask step wrote inf values, its loss
    had been finite, and the phase's end checkpointed them before anything looked again."""
    out = tmp_path / "run"
    # 16 examples in batches of 8: the L0 phase is steps 1-2 (checkpointed at its end); the
    # fixed-mask phase is step 3 alone, and its end would be checkpointed too
    with pytest.raises(TrainingDiverged) as excinfo:
        train(settings(tiny_model, glue_dir, out, method="diff-struct"), {"fixed_lr": 1e39, "fixed_epochs": 0.5})
    message = str(excinfo.value)
    kept = out / "checkpoints" / "step-2"
    assert "at step 3 (phase fixed-mask)" in message and f"the last finite checkpoint is {kept}" in message
    assert checkpoints(out) == ["step-2"] and all_finite(kept)
    assert not (out / "patch.safetensors").exists() and not (out / "run.json").exists()


# ---- an output the run cannot write ------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Make loading the model fail loudly: the checks under test must come before it."""
    import diffprune.api

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(diffprune.api, "load_base", refuse)


def test_a_read_only_output_folder_is_refused_before_the_model_loads(tiny_model, glue_dir, tmp_path, no_model_load):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: a folder's permissions do not stop this process writing")
        with pytest.raises(DiffpruneError, match=f"--output {out} cannot be written: Permission denied"):
            train(settings(tiny_model, glue_dir, out))
        with pytest.raises(DiffpruneError, match="cannot be written"):
            train(settings(tiny_model, glue_dir, out / "run"))  # a new folder inside it
    finally:
        out.chmod(stat.S_IRWXU)


def test_an_output_under_a_file_is_refused_before_the_model_loads(tiny_model, glue_dir, tmp_path, no_model_load):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "runs" / "mrpc"
    with pytest.raises(DiffpruneError, match=f"cannot be made: {tmp_path / 'notes.txt'} is a file"):
        train(settings(tiny_model, glue_dir, out))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_full_disk_is_refused_before_the_model_loads(tiny_model, glue_dir, tmp_path, monkeypatch, no_model_load):
    import diffprune.training.checkpoint as checkpoint

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    out = tmp_path / "run"
    with pytest.raises(DiffpruneError, match="cannot be written: no space left on the device") as excinfo:
        train(settings(tiny_model, glue_dir, out))
    assert "\n" not in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []  # the probe left nothing behind


@pytest.mark.parametrize("failure", ["safetensors", "oserror"])
def test_a_disk_that_fills_during_the_run_is_a_one_line_error(tiny_model, glue_dir, tmp_path, monkeypatch, failure):
    """The probe passed, then a checkpoint write failed: as safetensors reports it, or as an
    OSError naming the file."""
    import diffprune.training.checkpoint as checkpoint
    from safetensors import SafetensorError

    def full(tensors, path, *args, **kwargs):
        if failure == "safetensors":
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "run"
    with pytest.raises(DiffpruneError) as excinfo:
        train(settings(tiny_model, glue_dir, out))
    message = str(excinfo.value)
    assert message.startswith(f"cannot write {'into ' if failure == 'safetensors' else ''}{out}")
    assert message.endswith(": no space left on the device") and "\n" not in message
    assert checkpoints(out) == []


def test_the_cli_reports_an_unwritable_output_in_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = run_cli("train", "--output", str(tmp_path / "a-file" / "run"), timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --output") and "is a file" in lines[0]
