"""What a method is, and the string-keyed registry that finds one.

A method is "a way to learn a patch": it wraps the base model, names the parameters it trains
in one or more phases, and saves what it learned. Adding a method is one new module with a
`@register`-ed class and one import line in `methods/__init__.py`; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError
from diffprune.training.phases import Phase
from diffprune.training.settings import TrainSettings, check_types

METHODS: dict[str, type[Method]] = {}


@dataclass
class NoOptions:
    """The method has no options of its own."""


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type] = NoOptions
    default_lr: ClassVar[float] = 5e-5
    artifact: ClassVar[str | None] = None  # the file or folder `save` writes into the run folder
    fsdp_refused: ClassVar[str | None] = None  # why the method cannot train under FSDP, if it cannot

    def lr(self, settings: TrainSettings) -> float:
        return settings.lr if settings.lr is not None else self.default_lr

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def prepare(self, base: BaseModel) -> nn.Module:
        """Return the module to train: `forward(**batch)` gives an HF output with `.loss` and `.logits`."""
        raise NotImplementedError

    def phases(self, model: nn.Module, base: BaseModel, settings: TrainSettings) -> list[Phase]:
        raise NotImplementedError

    def finish(self, model: nn.Module) -> None:
        """After training, before the final dev evaluation: put the model in the state its
        artifact will hold, so that the recorded scores are the artifact's."""

    def trainable_params(self, model: nn.Module) -> int:
        """Parameters this method stores per task (what the record's `trainable_params` reports)."""
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to resume, and what "keep the best epoch" snapshots."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise DiffpruneError(f"checkpoint holds tensors this model lacks, e.g. {result.unexpected_keys[0]}")

    def save(self, model: nn.Module, base: BaseModel, output: Path, record: dict) -> dict[str, int]:
        """Write the learned artifact into `output`; return {relative file name: bytes}."""
        return {}

    def artifact_files(self, output: Path) -> dict[str, int]:
        """{file name relative to `output`: bytes} of the artifact folder `save` wrote."""
        return {str(p.relative_to(output)): p.stat().st_size for p in sorted((output / self.artifact).iterdir())}

    def load_artifact(self, base: BaseModel, output: Path) -> nn.Module:
        """Rebuild the trained model from what `save` wrote (for eval and predict)."""
        raise DiffpruneError(f"method '{self.name}' saves no artifact that can be loaded again")

    def record_extras(self, model: nn.Module, base: BaseModel) -> dict[str, Any]:
        """Method-specific fields for the run record (e.g. nnz and budget for a patch)."""
        return {}


def artifact_names() -> set[str]:
    """What any method may have saved into a run folder (cleared by --overwrite)."""
    return {m.artifact for m in METHODS.values() if m.artifact}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise DiffpruneError(f"unknown method '{name}'; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """Instantiate a method from a flat dict of its options; unknown options are an error."""
    cls = get_method(name)
    known = {f.name for f in fields(cls.Config)}
    unknown = sorted(set(options or {}) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise DiffpruneError(f"option(s) {', '.join(unknown)} do not apply to method '{name}' (its options: {allowed})")
    check_types(cls.Config, options or {})
    return cls(cls.Config(**(options or {})))
