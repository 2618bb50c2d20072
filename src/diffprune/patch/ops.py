"""Patch operations that need a base model: load the right base, apply, export."""

from __future__ import annotations

from pathlib import Path

from diffprune.base import DEFAULT_MODEL_NAME, BaseModel, load_base
from diffprune.errors import DiffpruneError
from diffprune.heads import MODEL_HEAD
from diffprune.patch.taskpatch import TaskPatch, export_model


def base_for(patch: TaskPatch, model: str | None = None) -> BaseModel:
    """The base a patch names (the packaged MiniLM for the default), or `model` if given.
    Either way, applying checks the fingerprint, so a wrong base is refused."""
    name = model or patch.meta.get("base")
    if model is None and name and Path(name).is_absolute() and not Path(name).is_dir():
        raise DiffpruneError(f"the patch was made on the base model in '{name}', which is not here; "
                             "pass --base MODEL (its fingerprint is checked)")
    labels = patch.meta.get("labels")
    return load_base(
        None if name == DEFAULT_MODEL_NAME else name,
        int(patch.meta.get("num_labels") or 2),
        labels=tuple(labels) if labels else None,
        regression=patch.meta.get("problem_type") == "regression",
        head=patch.meta.get("head") or MODEL_HEAD,  # patches made before heads were a choice: the model's
    )


def export(patch_path: str | Path, output: str | Path, model: str | None = None) -> Path:
    """Write base + patch as a plain transformers model folder."""
    patch = TaskPatch.load(patch_path)
    return export_model(patch, base_for(patch, model), output)
