"""GLUE: task definitions, data loading, metrics and submission files."""

from diffprune.glue.data import (
    Example,
    TokenizedDataset,
    examples_from_hf,
    load_hub_split,
    load_split,
    make_collator,
    read_glue_split,
    resolve_data_dir,
)
from diffprune.glue.metrics import compute_metrics, majority_class_metrics, predictions_from_logits
from diffprune.glue.submission import submission_path, write_submission
from diffprune.glue.tasks import TASKS, TaskSpec, get_task, resolve_split

__all__ = [
    "TASKS",
    "Example",
    "TaskSpec",
    "TokenizedDataset",
    "compute_metrics",
    "examples_from_hf",
    "get_task",
    "load_hub_split",
    "load_split",
    "majority_class_metrics",
    "make_collator",
    "predictions_from_logits",
    "read_glue_split",
    "resolve_data_dir",
    "resolve_split",
    "submission_path",
    "write_submission",
]
