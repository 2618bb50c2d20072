"""Each task's own head, run beside the shared model, through one function: `forward_with_heads`.

A served patch brings its head and the model keeps whatever head it was loaded with. Head kinds
are named in patch meta as `head` (diffprune.heads; absent means the model's own):

* "model": the architecture's own head. Forward hooks on the modules that own head parameters
  run each task's tensors on that task's rows (torch.func.functional_call), padding outputs of
  different widths with zeros. Works for any head of row-wise modules with the batch first
  (BERT's classifier Linear, RoBERTa's dense + out_proj, DistilBERT's pre_classifier + classifier).
* "cls-mix" / "mean-mix": a learned mix of every layer into an MLP (diffprune.heads.LayerMixHead),
  computed after the forward from every layer's hidden states, on each task's rows.

Serving another kind is one more branch in `forward_with_heads` and in `head_problem`.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError
from diffprune.heads import HEADS, MODEL_HEAD, POOLINGS, LayerMixHead

MIX_PREFIX = "classifier."  # where LayerMixClassifier keeps its head


def head_kind(meta: dict) -> str:
    """The patch's head kind, refused with the reason if this server cannot run it."""
    kind = meta.get("head") or MODEL_HEAD
    if kind not in HEADS:
        raise DiffpruneError(f"its head is of kind '{kind}', and this server runs {', '.join(HEADS)}")
    return kind


def _expected(base: BaseModel, kind: str) -> dict[str, tuple[int, ...]]:
    if kind == MODEL_HEAD:
        return {n: tuple(p.shape) for n, p in base.model.named_parameters() if n in base.head_names}
    return {MIX_PREFIX + n: tuple(p.shape) for n, p in _mix_module(base, kind).named_parameters()}


def head_problem(head: dict[str, torch.Tensor], base: BaseModel, kind: str = MODEL_HEAD) -> str | None:
    """Why a patch's head cannot run on this model (None if it can): it must hold exactly the
    head tensors of its kind, each of their shape except in the first dimension (the outputs)."""
    own = _expected(base, kind)
    if set(head) != set(own):
        missing, extra = sorted(set(own) - set(head)), sorted(set(head) - set(own))
        what = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}', which is not"
        return f"its '{kind}' head {what} of the head tensors ({', '.join(sorted(own))})"
    for name, t in head.items():
        if t.dim() != len(own[name]) or tuple(t.shape[1:]) != own[name][1:]:
            return f"its head tensor '{name}' has shape {tuple(t.shape)}, the model's {own[name]}"
    return None


def forward_with_heads(base: BaseModel, heads: list[dict[str, torch.Tensor]], kinds: list[str],
                       row_slots: torch.Tensor, encoded: dict) -> torch.Tensor:
    """One forward of `base.model` over the batch, row r computed with heads[row_slots[r]] (of
    kind kinds[...]); logits as wide as the widest head, narrower heads' rows padded with zeros."""
    own = [s for s, k in enumerate(kinds) if k == MODEL_HEAD]
    mixes = [s for s, k in enumerate(kinds) if k != MODEL_HEAD]
    with _own_heads(base, heads, row_slots, own):
        out = base.model(**encoded, output_hidden_states=bool(mixes))
    parts = [(_rows(row_slots, own), out.logits)] if own else []
    for s in mixes:
        rows = _rows(row_slots, [s])
        module = _mix_module(base, kinds[s])
        tensors = {n[len(MIX_PREFIX):]: t for n, t in heads[s].items()}
        mask = encoded.get("attention_mask")
        hidden = tuple(h[rows] for h in out.hidden_states)
        parts.append((rows, functional_call(module, tensors, (hidden, None if mask is None else mask[rows]))))
    width = max(o.shape[-1] for _, o in parts)
    logits = parts[0][1].new_zeros((row_slots.numel(), width))
    for rows, o in parts:
        logits[rows, : o.shape[-1]] = o[rows] if o.shape[0] == row_slots.numel() else o
    return logits


def _rows(row_slots: torch.Tensor, slots: list[int]) -> torch.Tensor:
    return torch.isin(row_slots, torch.tensor(slots, dtype=row_slots.dtype)).nonzero().squeeze(1)


_MIX_MODULES: dict[tuple[int, str], LayerMixHead] = {}


def _mix_module(base: BaseModel, kind: str) -> LayerMixHead:
    """A LayerMixHead of the model's shape in eval mode, whose tensors each task replaces."""
    key = (id(base.model.config), kind)
    if key not in _MIX_MODULES:
        _MIX_MODULES[key] = LayerMixHead(base.model.config, POOLINGS[kind]).eval()
    return _MIX_MODULES[key]


@contextmanager
def _own_heads(base: BaseModel, heads: list[dict[str, torch.Tensor]], row_slots: torch.Tensor, slots: list[int]):
    """Hooks making the model's own head modules run every slot in `slots` on its own rows."""
    if not slots:
        yield
        return
    owners: dict[str, list[str]] = defaultdict(list)
    for name in sorted(base.head_names):
        path, _, local = name.rpartition(".")
        owners[path].append(local)
    modules = dict(base.model.named_modules())
    slot_rows = [(s, (row_slots == s).nonzero().squeeze(1)) for s in slots]
    slot_rows = [(s, rows) for s, rows in slot_rows if rows.numel()]
    handles = []
    try:
        for path, locals_ in owners.items():
            tensors = {s: {local: heads[s][f"{path}.{local}" if path else local] for local in locals_}
                       for s, _ in slot_rows}
            handles.append(modules[path].register_forward_hook(
                _per_row_hook(tensors, slot_rows, len(row_slots)), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _per_row_hook(tensors: dict[int, dict[str, torch.Tensor]], slot_rows: list, batch: int):
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
