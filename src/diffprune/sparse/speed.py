"""Load a model for sparse inference (from a run, a patch of any kind or an HF folder with zeros)
and time it dense against sparse on this machine.

The timing alternates the two models in blocks of calls on the same inputs (time_in_blocks), so
that load from other work on the machine falls on both alike; each figure is a median after
warm-up.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffprune.base import BaseModel, load_base
from diffprune.errors import DiffpruneError
from diffprune.sparse.convert import SparsifyReport, sparsify
from diffprune.sparse.linear import SparseLinear
from diffprune.sparse.timing import time_in_blocks, token_inputs


def load_for_inference(source: str | os.PathLike, model: str | None = None) -> BaseModel:
    """The task model of `source`: a run folder (its artifact on its base), a patch file (applied
    on the base it names, or `model`; fingerprint checked), or a transformers model folder."""
    path = Path(source)
    if path.is_dir() and (path / "run.json").exists():
        from diffprune.api import load_run

        # The data folder is never read here: naming one keeps a moved GLUE folder from failing the load.
        _, _, base, task_model = load_run(path, str(path), 1)
        base.model = task_model
        return base
    if path.is_file():
        from diffprune.patch import TaskPatch
        from diffprune.patch.ops import base_for

        patch = TaskPatch.load(path)
        base = base_for(patch, model)
        patch.apply(base)
        return base
    if path.is_dir() and (path / "config.json").exists():
        return load_base(path)
    raise DiffpruneError(f"'{source}' is neither a run folder (run.json), a patch file nor a model folder (config.json)")


def check_threads(threads: int) -> int:
    from diffprune.sparse.kernel import max_threads

    limit = min(os.cpu_count() or 1, max_threads())
    if not 1 <= threads <= limit:
        raise DiffpruneError(f"threads must be between 1 and {limit} (the cores numba and torch can use here), "
                             f"not {threads}")
    return threads


def random_inputs(base: BaseModel, batch_size: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids drawn from the vocabulary and a full mask, within the model's limits."""
    limit = base.max_positions()
    if batch_size < 1 or length < 1:
        raise DiffpruneError(f"batch size and length must be at least 1 (got {batch_size} and {length})")
    if limit is not None and length > limit:
        raise DiffpruneError(f"length {length} is beyond this model's limit of {limit} tokens")
    return token_inputs(int(getattr(base.model.config, "vocab_size", 0) or 1000), batch_size, length, seed)


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the Linear layers' weights: as they are stored in `model`, and as dense fp32."""
    stored = dense = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            stored += m.weight_bytes()
            dense += 4 * m.in_features * m.out_features
        elif type(m) is nn.Linear:
            stored += m.weight.numel() * m.weight.element_size()
            dense += 4 * m.weight.numel()
    return {"stored": stored, "dense_fp32": dense}


@dataclass
class SpeedResult:
    batch_size: int
    length: int
    threads: int
    dense_ms: float
    sparse_ms: float
    max_abs_diff: float
    weight_bytes: dict[str, int]
    report: SparsifyReport

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "length": self.length, "threads": self.threads,
                "dense_ms": self.dense_ms, "sparse_ms": self.sparse_ms, "speedup": self.speedup,
                "max_abs_diff": self.max_abs_diff, "weight_bytes": self.weight_bytes,
                "sparse_layers": len(self.report.sparse_layers), "load_avg": os.getloadavg()}


def compare_speed(base: BaseModel, batch_size: int = 1, length: int = 128, threads: int | None = None,
                  repeats: int = 30) -> SpeedResult:
    """Latency of the dense model and of a sparsified copy at `batch_size` x `length` tokens."""
    threads = check_threads(threads if threads is not None else torch.get_num_threads())
    inputs = random_inputs(base, batch_size, length)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dense = base.model.eval()
        sparse = copy.deepcopy(dense)
        report = sparsify(sparse, batch_size=batch_size, length=length)
        with torch.no_grad():
            diff = (_logits(dense, inputs) - _logits(sparse, inputs)).abs().max().item()
        times = time_in_blocks({"dense": lambda: dense(**inputs), "sparse": lambda: sparse(**inputs)}, repeats)
        ms = {name: statistics.median(t) for name, t in times.items()}
    finally:
        torch.set_num_threads(previous)
    return SpeedResult(batch_size, length, threads, ms["dense"], ms["sparse"], diff, linear_weight_bytes(sparse),
                       report)


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def load_sparse(source: str | os.PathLike, model: str | None = None, batch_size: int = 1,
                length: int = 128) -> tuple[BaseModel, SparsifyReport]:
    """`load_for_inference` then `sparsify`: the task model of a run, a patch or a model folder
    with its pruned Linear layers sparse where that is measured faster at batch_size x length."""
    base = load_for_inference(source, model)
    base.model.eval()
    return base, sparsify(base.model, batch_size=batch_size, length=length)
