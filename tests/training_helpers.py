"""What the in-process training tests share: the settings of a tiny run, a run's saved weights,
and one finished run."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import GLUE_FIXTURES
from diffprune.api import train
from diffprune.training.settings import TrainSettings


def settings(model: str, glue_dir: str, output: Path, **overrides) -> TrainSettings:
    values = dict(
        task="MRPC", method="full", model=model, data_dir=glue_dir, output=str(output), seed=7,
        epochs=2, batch_size=8, max_seq_length=64, max_train_samples=16, max_eval_samples=16,
        checkpoint_every=2, log_every=1,
    )
    values.update(overrides)
    return TrainSettings(**values)


def saved_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def finished_run(model: str, folder: Path) -> tuple[Path, dict]:
    """One finished full-finetuning run (2 epochs of 2 steps) in folder / "run", and its record."""
    out = folder / "run"
    return out, train(settings(model, str(GLUE_FIXTURES), out))
