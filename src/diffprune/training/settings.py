"""The settings every run shares. Each field's help text is also its CLI help (see cli.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from diffprune.errors import DiffpruneError
from diffprune.heads import HEADS


def option(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


_KINDS = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "list[str]":  # a list, or the comma-separated string a flag gives
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    # bool is an int to Python, but `epochs = true` is a mistake
    return kind in _KINDS and isinstance(value, _KINDS[kind]) and (kind == "bool" or not isinstance(value, bool))


def check_types(cls: type, values: dict[str, Any]) -> None:
    """Each value given for a field of the settings dataclass `cls` has the field's annotated
    type. Values from a config file or the Python API arrive untyped (TOML `epochs = "3"` is a
    string); this makes them a clear error instead of a TypeError deep inside the run."""
    for f in fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        kinds = str(f.type).replace(" ", "").split("|")  # annotations are strings here
        if value is None and "None" in kinds:
            continue
        if not any(_is_kind(value, k) for k in kinds):
            raise DiffpruneError(f"setting '{f.name}' must be {' or '.join(kinds)}, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every `x <= 0` check
            raise DiffpruneError(f"setting '{f.name}' must be a finite number, not {value!r}")


@dataclass
class TrainSettings:
    task: str = option("MRPC", "GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE or WNLI.")
    method: str = option("full", "How the task is learned (see `diffprune methods`).")
    model: str | None = option(
        None, "HF model id or local folder of the base model; default: the packaged all-MiniLM-L6-v2."
    )
    head: str = option(
        "model", "Task head: model (the architecture's own; BERT: linear on the pooled last [CLS]), cls-mix "
        "(adapting-by-pruning's: a learned mix of every layer's [CLS] into a ReLU MLP of the model's width) or "
        "mean-mix (the same over each layer's mean over tokens, how sentence encoders are read). The mixed heads "
        "need a method whose result is a patch."
    )
    data_dir: str | None = option(
        None, "GLUE folder (TASK/train.tsv, ...); default: $GLUE_DIR, else the HF hub via `datasets`."
    )
    output: str | None = option(None, "Folder for everything the run writes (required).")
    seed: int = option(42, "Random seed: head init, data order, dropout.")
    epochs: float = option(3.0, "Epochs per training phase.")
    max_steps: int | None = option(None, "Stop each phase after this many optimiser steps (overrides --epochs).")
    batch_size: int = option(32, "Global batch size (split across processes when launched distributed).")
    eval_batch_size: int = option(128, "Batch size for evaluation and prediction.")
    lr: float | None = option(
        None, "Peak learning rate of the method's main parameters; default: the method's own (`diffprune methods`)."
    )
    head_lr: float | None = option(
        None, "Learning rate of the task head in every phase; default: that phase's main rate (--lr; diff pruning's "
        "fixed-mask phase: --fixed-lr)."
    )
    weight_decay: float = option(0.01, "AdamW weight decay on matrices (not on biases and norms).")
    warmup_ratio: float = option(0.1, "Fraction of each phase's steps spent in linear warmup.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).")
    max_seq_length: int = option(128, "Longer inputs are truncated; batches are padded dynamically.")
    group_by_length: bool = option(
        False, "Batch examples of similar length together (fewer padded tokens: faster on a CPU; "
        "the batches still come in random order).")
    max_train_samples: int | None = option(None, "Train on the first N training examples only (smoke tests).")
    max_eval_samples: int | None = option(None, "Evaluate on the first N dev examples only (smoke tests).")
    checkpoint_every: int = option(200, "Write a resumable checkpoint every N optimiser steps (0: only at epoch ends).")
    log_every: int = option(10, "Log loss terms to CSV and TensorBoard every N steps.")
    mixed_precision: str = option("no", "Mixed precision through Accelerate: no, fp16 or bf16.")
    save_model: bool = option(True, "Write the trained artifact (model, adapter or patch) into --output.")
    overwrite: bool = option(False, "Replace a previous run in --output.")
    resume: bool = option(False, "Continue the interrupted run in --output from its last checkpoint.")

    def __post_init__(self) -> None:
        check_types(type(self), vars(self))
        checks = [
            (0 <= self.seed < 2**32, "--seed must be in [0, 2**32)"),
            (self.epochs > 0, "--epochs must be positive"),
            (self.max_steps is None or self.max_steps > 0, "--max-steps must be positive"),
            (self.batch_size > 0 and self.eval_batch_size > 0, "batch sizes must be positive"),
            ((self.lr is None or self.lr > 0) and (self.head_lr is None or self.head_lr > 0), "learning rates must be positive"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.max_seq_length > 8, "--max-seq-length must be larger than 8"),
            (self.weight_decay >= 0 and self.max_grad_norm >= 0, "--weight-decay and --max-grad-norm cannot be negative"),
            (all(n is None or n > 0 for n in (self.max_train_samples, self.max_eval_samples)),
             "--max-train-samples and --max-eval-samples must be positive"),
            (self.log_every > 0 and self.checkpoint_every >= 0,
             "--log-every must be positive and --checkpoint-every not negative"),
            (self.mixed_precision in ("no", "fp16", "bf16"), "--mixed-precision must be no, fp16 or bf16"),
            (not (self.overwrite and self.resume), "--overwrite and --resume exclude each other"),
            (self.head in HEADS, f"--head must be one of {', '.join(HEADS)}, not {self.head!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DiffpruneError(message)

    # Settings that do not change what is computed, so a resumed run may differ in them.
    RUN_CONTROL = ("output", "overwrite", "resume", "checkpoint_every", "log_every", "data_dir", "save_model")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def computation(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in self.RUN_CONTROL}

    @classmethod
    def computation_defaults(cls) -> dict[str, Any]:
        """What a run made before a setting existed counts as having used (check_resumable)."""
        return {f.name: f.default for f in fields(cls) if f.name not in cls.RUN_CONTROL}
