"""Random patches of a chosen density, for serving tests and benchmarks.

Serving time and memory depend on where a patch's entries are and how many, not on what was
learned, so a patch of random positions (uniform within every tensor) and random values stands
in for trained ones of the same density. Its head has the model's head shapes with `num_labels`
outputs.
"""

from __future__ import annotations

import torch

from diffprune.base import BaseModel
from diffprune.heads import MODEL_HEAD, POOLINGS, LayerMixHead
from diffprune.patch.kinds import ADD, MASK, SparseDiff
from diffprune.patch.taskpatch import TaskPatch
from diffprune.serving.heads import MIX_PREFIX


def random_patch(base: BaseModel, density: float, num_labels: int = 2, *, seed: int = 0, kind: str = ADD,
                 regression: bool = False, labels: list[str] | None = None, task: str = "synthetic",
                 tensors: list[str] | None = None, scale: float = 0.02, max_seq_length: int = 128,
                 head: str = MODEL_HEAD) -> TaskPatch:
    """A patch changing `density` of the entries of every base tensor (or of `tensors`), with a
    random head of kind `head` (diffprune.heads)."""
    g = torch.Generator().manual_seed(seed)
    diffs = {}
    for name, p in base.base_parameters().items():
        if tensors is not None and name not in tensors:
            continue
        k = max(1, round(p.numel() * density))
        positions = torch.randperm(p.numel(), generator=g)[:k].sort().values
        values = None if kind == MASK else torch.randn(k, generator=g) * scale
        diffs[name] = SparseDiff(tuple(p.shape), positions, values, kind)
    outputs = 1 if regression else num_labels
    kind, head = head, _random_head(base, head, outputs, g)
    if labels is None and not regression:
        labels = [f"{task}-{i}" for i in range(outputs)]
    meta = {"base": base.name, "fingerprint": base.fingerprint, "method": "synthetic", "task": task,
            "labels": None if regression else labels, "num_labels": outputs,
            "problem_type": "regression" if regression else "single_label_classification",
            "max_seq_length": max_seq_length, "base_params": base.num_base_params, "head": kind}
    return TaskPatch(diffs, head, meta)


def _random_head(base: BaseModel, kind: str, outputs: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    if kind == MODEL_HEAD:
        own, shapes = base.model.config.num_labels, {n: p.shape for n, p in base.head_parameters().items()}
    else:
        module = LayerMixHead(base.model.config, POOLINGS[kind])
        own, shapes = module.out_proj.out_features, {MIX_PREFIX + n: p.shape for n, p in module.named_parameters()}
    return {n: torch.randn((outputs, *s[1:]) if s[0] == own else tuple(s), generator=g) * 0.2
            for n, s in shapes.items()}
