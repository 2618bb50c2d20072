"""Each task's own head, run beside the shared model.

A served patch brings its head (the tensors of `BaseModel.head_names`, of any number of outputs:
two or three classes, one regression value) and the model keeps whatever head it was loaded
with. `task_heads` makes one forward of the model compute every row with its own task's head:
forward hooks on the modules that own head parameters run each task's tensors on that task's
rows (torch.func.functional_call), padding outputs of different widths with zeros. It works
for any head made of row-wise modules with the batch first (BERT's classifier Linear,
RoBERTa's dense + out_proj, DistilBERT's pre_classifier + classifier).

Head kinds are named in patch meta as `head` (absent or "model": the model's own head). Serving
another kind is one change here: `HEAD_KINDS` and the branch in `task_heads`.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError

MODEL_HEAD = "model"
HEAD_KINDS = (MODEL_HEAD,)


def head_kind(meta: dict) -> str:
    """The patch's head kind, refused with the reason if this server cannot run it."""
    kind = meta.get("head") or MODEL_HEAD
    if kind not in HEAD_KINDS:
        raise DiffpruneError(f"its head is of kind '{kind}', and serving runs only the model's own head "
                             f"(meta 'head' absent or '{MODEL_HEAD}')")
    return kind


def head_problem(head: dict[str, torch.Tensor], base: BaseModel) -> str | None:
    """Why a patch's head cannot run on this model (None if it can): it must hold exactly the
    model's head tensors, each of the model's shape except in its first dimension (the outputs)."""
    own = {n: p for n, p in base.model.named_parameters() if n in base.head_names}
    if set(head) != set(own):
        missing, extra = sorted(set(own) - set(head)), sorted(set(head) - set(own))
        what = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}', which is not"
        return f"its head {what} of the model's head tensors ({', '.join(sorted(own))})"
    for name, t in head.items():
        if t.dim() != own[name].dim() or tuple(t.shape[1:]) != tuple(own[name].shape[1:]):
            return f"its head tensor '{name}' has shape {tuple(t.shape)}, the model's {tuple(own[name].shape)}"
    return None


@contextmanager
def task_heads(base: BaseModel, heads: list[dict[str, torch.Tensor]], row_slots: torch.Tensor):
    """Within the block, a forward of `base.model` computes row r with heads[row_slots[r]];
    the logits are as wide as the widest head (narrower heads' rows padded with zeros)."""
    if not heads:
        raise DiffpruneError("a batch needs at least one task head")
    owners: dict[str, list[str]] = defaultdict(list)
    for name in sorted(base.head_names):
        path, _, local = name.rpartition(".")
        owners[path].append(local)
    modules = dict(base.model.named_modules())
    slot_rows = [(s, (row_slots == s).nonzero().squeeze(1)) for s in range(len(heads))]
    slot_rows = [(s, rows) for s, rows in slot_rows if rows.numel()]
    handles = []
    try:
        for path, locals_ in owners.items():
            tensors = [{local: heads[s][f"{path}.{local}" if path else local] for local in locals_}
                       for s in range(len(heads))]
            handles.append(modules[path].register_forward_hook(
                _per_row_hook(tensors, slot_rows, len(row_slots)), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _per_row_hook(tensors: list[dict[str, torch.Tensor]], slot_rows: list, batch: int):
    inside = False  # functional_call runs the module, and so this hook, once more per task

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        nonlocal inside
        if inside:
            return output
        x, rest = args[0], args[1:]
        if x.shape[0] != batch:
            raise DiffpruneError(f"a head module got {x.shape[0]} rows for a batch of {batch}: "
                                 "this model's head does not run row by row")
        inside = True
        try:
            outs = [(rows, functional_call(module, tensors[s], (x[rows], *rest), kwargs)) for s, rows in slot_rows]
        finally:
            inside = False
        width = max(o.shape[-1] for _, o in outs)
        result = x.new_zeros((batch, *outs[0][1].shape[1:-1], width))
        for rows, o in outs:
            result[rows, ..., : o.shape[-1]] = o
        return result

    return hook
