"""diffprune: learn each task as a tiny sparse patch on one shared, frozen base model.

The public API: `load_base`, `TaskPatch`, `train`, `TrainSettings`, `evaluate_patch`,
`DiffpruneError` and `__version__` (README.md, "The task patch", shows them at work).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("diffprune")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from diffprune.errors import DiffpruneError

if TYPE_CHECKING:
    from diffprune.api import evaluate_patch, train
    from diffprune.base import load_base
    from diffprune.patch import TaskPatch
    from diffprune.training.settings import TrainSettings

# Imported on first use: `import diffprune` takes ~0.2 s, importing torch, transformers and
# accelerate with it ~5 s, which every CLI call (`--help` and errors included) would pay.
_LAZY = {
    "load_base": "diffprune.base",
    "TaskPatch": "diffprune.patch",
    "train": "diffprune.api",
    "evaluate_patch": "diffprune.api",
    "TrainSettings": "diffprune.training.settings",
}

__all__ = ["DiffpruneError", "TaskPatch", "TrainSettings", "__version__", "evaluate_patch", "load_base", "train"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'diffprune' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
