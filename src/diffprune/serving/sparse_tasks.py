"""Pruned task models served through the sparse CPU runtime instead of by switching.

A task whose patch prunes the base's Linear weights (the 'sparse' student of pruning at
distilling, a 'mask' of adapting by pruning) runs, by switching, at the dense base's speed:
its zeros are multiplied like any weight. With a sparse runtime it gets a model of its own in
which those Linears hold compressed rows and run on the sparse kernels (diffprune.sparse:
fused encoder layers where the layer's form allows, each layer kept dense where sparsify
measures it faster). Every parameter and buffer the patch leaves alone stays the base's own
tensor, so a task costs its pruned weights and the tensors it changes, not a model copy.

The model is made from the base with the patch applied (the one apply path, reverted after),
and shares the base's tensors: it must not run while another task's patch is switched onto the
base, nor be made while a batch runs. The engine makes it on the task's first batch and runs
one batch at a time.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from diffprune.base import BaseModel
from diffprune.patch import TaskPatch
from diffprune.patch.apply import apply_patch
from diffprune.patch.kinds import MASK, SPARSE

PRUNING_KINDS = (SPARSE, MASK)


def runtime_problem(patch: TaskPatch, modules: dict[str, nn.Module]) -> str | None:
    """Why `patch` gets no sparse runtime (None: it does)."""
    pruned = [n for n, d in patch.diffs.items() if d.kind in PRUNING_KINDS and n.endswith(".weight")
              and isinstance(modules.get(n.rpartition(".")[0]), nn.Linear)]
    if not pruned:
        return "it prunes no Linear weight"
    device = next(iter(modules[""].parameters())).device
    return None if device.type == "cpu" else f"the sparse runtime runs on the CPU, the base is on {device}"


def sparse_task_model(base: BaseModel, patch: TaskPatch) -> tuple[BaseModel, int]:
    """The task's model on the sparse runtime (as a BaseModel beside `base`, whose tensors it
    shares wherever the patch changes nothing) and the bytes of the tensors it holds itself."""
    from diffprune.sparse import sparsify

    with torch.no_grad():
        with apply_patch(patch, base, head=False):
            model = copy.deepcopy(base.model)  # the task's weights; the base is reverted after
        sparsify(model, choose="measure")  # (may keep a copy of the model: shared after)
        _share_unchanged(model, base.model, set(patch.diffs))
    task = dataclasses.replace(base, model=model.eval())
    return task, own_bytes(model, base.model)


def _share_unchanged(model: nn.Module, base_model: nn.Module, changed: set[str]) -> None:
    """Point every parameter and buffer of `model` that the patch did not change at the base's."""
    base_modules = dict(base_model.named_modules())
    for path, module in model.named_modules():
        twin = base_modules.get(path)
        if twin is None:
            continue
        prefix = f"{path}." if path else ""
        for store, twin_store in ((module._parameters, twin._parameters), (module._buffers, twin._buffers)):
            for local, tensor in store.items():
                if tensor is not None and prefix + local not in changed and twin_store.get(local) is not None:
                    store[local] = twin_store[local]


def own_bytes(model: nn.Module, base_model: nn.Module) -> int:
    """Bytes of the tensors `model` holds that `base_model` does not (each storage once)."""
    def storages(m: nn.Module) -> dict[int, int]:
        tensors = [*m.parameters(), *m.buffers()]
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}

    shared = storages(base_model)
    return sum(size for ptr, size in storages(model).items() if ptr not in shared)
