"""Prediction files in the format the GLUE evaluation server accepts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from diffprune.errors import DiffpruneError
from diffprune.glue.data import Example
from diffprune.glue.tasks import TaskSpec, get_task, resolve_split

# The server wants label strings for the NLI tasks and the integer for the binary ones.
_STRING_LABELS = {"MNLI", "QNLI", "RTE"}


def _format(spec: TaskSpec, value: Any, i: int) -> str:
    if spec.is_regression:
        score = float(value)
        if not np.isfinite(score):
            raise DiffpruneError(f"{spec.name} prediction {i} is {score}; expected a finite score")
        return f"{min(max(score, 0.0), 5.0):.3f}"  # the server expects scores in [0, 5]
    fvalue = float(value)
    if not fvalue.is_integer() or not 0 <= fvalue < spec.num_labels:
        raise DiffpruneError(
            f"{spec.name} prediction {i} is {value}; expected a label id in 0..{spec.num_labels - 1}"
        )
    label_id = int(fvalue)
    assert spec.labels is not None
    return spec.labels[label_id] if spec.name in _STRING_LABELS else str(label_id)


def submission_path(task: str | TaskSpec, split: str, output_dir: str | os.PathLike,
                    overwrite: bool = False) -> Path:
    """Where the submission file of a test split goes (`<output_dir>/<stem>.tsv`). An existing
    file is refused unless `overwrite`: a submission is what was sent, or is about to be."""
    spec = get_task(task)
    split = resolve_split(spec, split)
    if split not in spec.submission_names:
        raise DiffpruneError(
            f"GLUE submissions are made on test splits; {spec.name} split '{split}' is not one "
            f"(choose {', '.join(spec.test_splits)})"
        )
    path = Path(output_dir) / f"{spec.submission_names[split]}.tsv"
    if path.exists() and not overwrite:
        raise DiffpruneError(f"{path} already exists; pass --overwrite to replace it")
    return path


def write_submission(
    task: str | TaskSpec,
    split: str,
    examples: Sequence[Example],
    predictions: Any,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write `<output_dir>/<stem>.tsv` ("index\\tprediction" rows) atomically; return its path.
    An existing file is replaced only with `overwrite`."""
    from diffprune.io import write_text

    spec = get_task(task)
    path = submission_path(spec, split, output_dir, overwrite)
    split = resolve_split(spec, split)
    if isinstance(predictions, torch.Tensor):
        predictions = predictions.detach().float().cpu().numpy()
    preds = np.asarray(predictions)
    if preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if preds.ndim != 1:
        raise DiffpruneError(
            f"{spec.name} predictions must be one value per example, got shape {preds.shape} "
            f"(turn logits into predictions with predictions_from_logits first)"
        )
    if len(preds) != len(examples):
        raise DiffpruneError(
            f"{len(preds)} predictions for {len(examples)} {spec.name} {split} examples"
        )
    lines = ["index\tprediction"]
    lines += [f"{ex.idx}\t{_format(spec, p, i)}" for i, (ex, p) in enumerate(zip(examples, preds))]
    try:
        write_text(path, "\n".join(lines) + "\n")
    except OSError as e:
        raise DiffpruneError(f"cannot write {path}: {e.strerror or type(e).__name__}") from None
    return path
