"""Saving and loading a method's result as a TaskPatch, the one artifact format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffprune import __version__
from diffprune.base import BaseModel
from diffprune.patch import TaskPatch

PATCH_FILE = "patch.safetensors"


def patch_meta(base: BaseModel, method: Any, record: dict) -> dict:
    return {
        "base": base.name,
        "fingerprint": base.fingerprint,
        "method": method.name,
        "task": record.get("task"),
        "labels": list(base.labels) if base.labels else None,
        "num_labels": base.model.config.num_labels,
        "problem_type": base.model.config.problem_type,
        "head": base.head,
        "config": {**vars(method.config)},
        "metrics": record.get("dev", {}),
        "max_seq_length": record.get("settings", {}).get("max_seq_length"),  # how eval must truncate
        "base_params": base.num_base_params,
        "library_version": __version__,
    }


def head_state(model: nn.Module, base: BaseModel) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in base.head_names}


def save_patch(patch: TaskPatch, output: Path, value_dtype: str) -> dict[str, int]:
    size = patch.save(output / PATCH_FILE, value_dtype=value_dtype)
    return {PATCH_FILE: size}


def patch_summary(method: Any, contents: str, model: nn.Module) -> dict[str, Any]:
    """The record's lines on the patch a run wrote (its bytes and `contents` beside a full fp32
    copy of `model`, head included); nothing where the run wrote none."""
    size = getattr(method, "patch_bytes", None)
    if size is None:
        return {}
    copy = 4 * sum(p.numel() for p in model.parameters())
    return {"patch_bytes": size, "summary": [
        f"patch: {size:,} bytes ({contents}); a full model copy: {copy:,} bytes ({copy / size:.0f}x larger)",
        f"patch written to {method.patch_path}"]}


def load_patched(base: BaseModel, output: Path) -> nn.Module:
    """Apply the run's patch onto the freshly loaded base (refused if the base differs)."""
    TaskPatch.load(output / PATCH_FILE).apply(base)
    return base.model

