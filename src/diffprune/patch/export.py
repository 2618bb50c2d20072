"""Exporting base + patch as a plain transformers model folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError
from diffprune.io import atomic_dir

if TYPE_CHECKING:
    from diffprune.patch.taskpatch import TaskPatch


def export_model(patch: TaskPatch, base: BaseModel, output_dir: str | os.PathLike) -> Path:
    """Write base+patch as a plain transformers model folder (loads with AutoModelForSequenceClassification):
    added diffs included, switched-off and pruned entries as zeros."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise DiffpruneError(f"{output_dir} exists and is not an empty folder; export writes a new model folder")
    config = base.model.config
    saved_labels = (config.id2label, config.label2id)
    labels = patch.meta.get("labels")
    with patch.apply(base):
        try:
            if labels and len(labels) == config.num_labels:  # name the outputs like the task does
                config.id2label = dict(enumerate(labels))
                config.label2id = {label: i for i, label in enumerate(labels)}
            with atomic_dir(output_dir) as tmp:
                base.model.save_pretrained(tmp)
                base.tokenizer.save_pretrained(tmp)
        finally:
            config.id2label, config.label2id = saved_labels
    return output_dir
