"""GLUE metrics, computed with sklearn/scipy so they match the official scorer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from diffprune.errors import DiffpruneError
from diffprune.glue.tasks import TaskSpec, get_task


def _as_array(values: Any, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64 if values.is_floating_point() else torch.int64).numpy()
    arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] == 1:  # a (n, 1) regression head output
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DiffpruneError(
            f"{what} must be one value per example, got shape {arr.shape} "
            f"(turn logits into predictions with predictions_from_logits first)"
        )
    return arr


def _class_ids(spec: TaskSpec, arr: np.ndarray, what: str) -> np.ndarray:
    # Accept 0./1. floats (e.g. labels that went through a float tensor) but nothing fractional.
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.equal(np.mod(arr, 1), 0)):
        raise DiffpruneError(f"{what} for {spec.name} must be integer label ids")
    ids = arr.astype(np.int64)
    bad = ids[(ids < 0) | (ids >= spec.num_labels)]
    if bad.size:
        raise DiffpruneError(
            f"{what} for {spec.name} contain label id {bad[0]}, outside 0..{spec.num_labels - 1}"
        )
    return ids


def _correlation(fn, a: np.ndarray, b: np.ndarray) -> float:
    # A constant column (e.g. a collapsed model predicting one score) has no defined correlation;
    # report 0.0 like sklearn's MCC does, so "best checkpoint" comparisons never meet a NaN.
    if np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0
    return float(fn(a, b)[0])


def compute_metrics(task: str | TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """All metrics of `task` as fractions, plus "score" (the main metric of the paper tables)."""
    spec = get_task(task)
    preds = _as_array(predictions, "predictions")
    golds = _as_array(labels, "labels")
    if len(preds) != len(golds):
        raise DiffpruneError(f"{len(preds)} predictions but {len(golds)} labels for {spec.name}")
    if len(preds) == 0:
        raise DiffpruneError(f"cannot compute {spec.name} metrics on zero examples")

    out: dict[str, float] = {}
    if spec.is_regression:
        preds, golds = preds.astype(np.float64), golds.astype(np.float64)
        if not (np.all(np.isfinite(preds)) and np.all(np.isfinite(golds))):
            raise DiffpruneError(f"{spec.name} predictions or labels contain NaN or infinity")
        out["pearson"] = _correlation(pearsonr, preds, golds)
        out["spearman"] = _correlation(spearmanr, preds, golds)
    else:
        preds, golds = _class_ids(spec, preds, "predictions"), _class_ids(spec, golds, "labels")
        for name in spec.metrics:
            if name == "accuracy":
                out[name] = float(accuracy_score(golds, preds))
            elif name == "f1":
                out[name] = float(f1_score(golds, preds, pos_label=1, average="binary", zero_division=0.0))
            elif name == "mcc":
                out[name] = float(matthews_corrcoef(golds, preds))
    out["score"] = out[spec.main_metric]
    return out


def predictions_from_logits(task: str | TaskSpec, logits: Any) -> np.ndarray:
    """Label ids (argmax over the last axis), or the squeezed scores of a regression head."""
    spec = get_task(task)
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()  # .float(): numpy has no bfloat16
    arr = np.asarray(logits)
    if spec.is_regression:
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise DiffpruneError(f"{spec.name} logits must have shape (n,) or (n, 1), got {arr.shape}")
        return arr.astype(np.float64)
    if arr.ndim != 2 or arr.shape[1] != spec.num_labels:
        raise DiffpruneError(
            f"{spec.name} logits must have shape (n, {spec.num_labels}), got {arr.shape}"
        )
    return arr.argmax(axis=-1)


def majority_class_metrics(task: str | TaskSpec, labels: Any) -> dict[str, float]:
    """The task's metrics for one constant answer: the most frequent label (ties: the lowest
    id), or the mean score for a regression task, whose correlations are then 0. A trained
    model's score means something only beside this one (MRPC's dev F1 is 0.81 for "paraphrase"
    throughout)."""
    spec = get_task(task)
    golds = _as_array(labels, "labels")
    if len(golds) == 0:
        raise DiffpruneError(f"cannot compute {spec.name} metrics on zero examples")
    if spec.is_regression:
        constant = float(np.mean(golds.astype(np.float64)))
    else:
        constant = int(np.bincount(_class_ids(spec, golds, "labels"), minlength=spec.num_labels).argmax())
    return compute_metrics(spec, np.full(len(golds), constant), golds)
