"""Mixed-task batches: one forward for rows of different tasks, with no patch applied.

The base computes as it always does; forward hooks on the modules a batch's patches change add
each row's own task's delta to that module's output (wrapping, not forking: modules are found by
type, never by the model's name):

* nn.Linear weight and bias: the delta's sparse product on that task's rows only, and its bias
  entries. On the fast path below, the Linear's forward is replaced within the block (restored
  after it): the delta and the base's bias are written into the output first and the base's
  matrix product is added into it (addmm), so that adding the delta costs no pass over the
  output of its own (a row's output of an FFN's first layer is 393 KB at 64 tokens: its
  read-modify-write after the product was most of the delta's time);
* nn.LayerNorm weight and bias: each row's weight entries times its normalised input, and its
  bias entries, added into the output;
* nn.Embedding weight: the changed entries of each looked-up row of the row's task.

On the CPU without gradients every module's delta is one numba call (kernel.py) that reads the
tasks' compact form (patch/compact.py) as the bank holds it: nothing is converted per batch.
Elsewhere the same sums run as torch operations (mixed_torch.py) on the decoded changes.

Only "add" patches whose every change sits in such a module can join a mixed batch
(`mix_problem` says why another cannot); the others are served by switching. The results
equal those of the patch applied in place up to float rounding (tests: within 1e-5).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from diffprune.errors import DiffpruneError
from diffprune.patch.compact import CompactDiffs
from diffprune.patch.kinds import ADD, SparseDiff
from diffprune.serving import mixed_torch

# compact form -> the model it was found mixable on (checking costs more than a layer's delta).
_CHECKED: weakref.WeakKeyDictionary[CompactDiffs, weakref.ref] = weakref.WeakKeyDictionary()


def _dead() -> None:
    return None


# The modules whose changes can be added per row, and which of their parameters.
MIXABLE = {nn.Linear: ("weight", "bias"), nn.Embedding: ("weight",), nn.LayerNorm: ("weight", "bias")}


def mix_problem(kinds: dict[str, str], modules: dict[str, nn.Module]) -> str | None:
    """Why a patch whose changes are `kinds` (name -> kind) cannot join a mixed batch (None if it can)."""
    for name, kind in kinds.items():
        path, _, local = name.rpartition(".")
        module = modules.get(path)
        if kind != ADD:
            return f"it holds '{kind}' changes"
        if type(module) not in MIXABLE or local not in MIXABLE[type(module)]:
            return f"it changes '{name}' of a {type(module).__name__}"
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            return f"it changes '{name}' of an embedding that renormalises rows"
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
            return f"it changes '{name}' of a norm over more than the last dimension"
    return None


def looked_up(names, modules: dict[str, nn.Module]) -> set[str]:
    """The changed tensors that a mixed batch reads by row (embeddings): their compact form
    keeps checkpoints."""
    return {n for n in names if isinstance(modules.get(n.rpartition(".")[0]), nn.Embedding)}


class MixedBatch:
    """The deltas of a batch whose row r belongs to task slot row_slots[r] (slot s: diffs[s],
    compact as the bank keeps them, or SparseDiffs by name, compacted here)."""

    def __init__(self, model: nn.Module, diffs: list[CompactDiffs | dict[str, SparseDiff]],
                 row_slots: torch.Tensor) -> None:
        self.model, self.row_slots = model, row_slots
        self.batch = int(row_slots.numel())
        modules = dict(model.named_modules())
        self.slots: list[CompactDiffs] = []
        for s, slot in enumerate(diffs):
            compact = isinstance(slot, CompactDiffs)
            if not (compact and _CHECKED.get(slot, _dead)() is model):  # a bank's tasks: checked once
                problem = mix_problem(slot.kinds() if compact else {n: d.kind for n, d in slot.items()}, modules)
                if problem:
                    raise DiffpruneError(f"task slot {s} cannot join a mixed batch: {problem}")
            if compact:
                _CHECKED[slot] = weakref.ref(model)
            self.slots.append(slot if compact else CompactDiffs.of(slot, torch.float32, looked_up(slot, modules)))
        # path -> local name -> the tensor index of that change in every slot's form (-1: none)
        self.changed: dict[str, dict[str, np.ndarray]] = {}
        for name in dict.fromkeys(n for c in self.slots for n in c.names):
            path, _, local = name.rpartition(".")
            self.changed.setdefault(path, {})[local] = np.array([c.index.get(name, -1) for c in self.slots], np.int64)
            if looked_up([name], modules) and not all(c.checkpointed(name) for c in self.slots if name in c.index):
                raise DiffpruneError(f"a task's compact form keeps no checkpoints for '{name}', which a mixed "
                                     "batch looks up by row (build it with looked_up=...)")
        self.modules = {path: modules[path] for path in self.changed}
        self._rows = row_slots.to("cpu", torch.int64).numpy()
        self._none = np.full(len(self.slots), -1, np.int64)
        self._arrays = self._decoded = None  # built on first use, once per batch

    @contextmanager
    def installed(self):
        """Within the block, a forward of the model over the batch adds every row's delta."""
        handles, replaced = [], []
        try:
            for path, module in self.modules.items():
                if isinstance(module, nn.Linear):
                    replaced.append((module, module.__dict__.get("forward")))
                    module.forward = self._linear_forward(module, path)
                else:
                    handles.append(module.register_forward_hook(self._hook(path, module)))
            yield self
        finally:
            for h in handles:
                h.remove()
            for module, own in replaced:  # the class's forward again, or one set on the module before
                del module.forward
                if own is not None:
                    module.forward = own

    def _linear_forward(self, m: nn.Linear, path: str):
        base_forward, changed = m.forward, self.changed[path]

        def forward(x: torch.Tensor) -> torch.Tensor:
            self._check_batch(x, m)
            if not self._fast(m.weight, x):
                return mixed_torch.linear(m, x, base_forward(x), self.per_slot(path), self.row_slots)
            return self._linear(m, x, changed)

        return forward

    def _hook(self, path: str, module: nn.Module):
        changed = self.changed[path]
        if isinstance(module, nn.Embedding):
            return lambda m, args, out: self._embedding(m, args[0], out, path, changed)
        return lambda m, args, out: self._layer_norm(m, args[0], out, path, changed)

    # -- the two paths --------------------------------------------------------------------------
    def _fast(self, out: torch.Tensor, x: torch.Tensor | None = None) -> bool:
        """Whether the numba kernels run this call (CPU float32, no gradients)."""
        ok = not torch.is_grad_enabled() and out.device.type == "cpu" and out.dtype == torch.float32
        return ok and (x is None or x.dtype == torch.float32)

    def arrays(self):
        if self._arrays is None:
            from diffprune.serving import kernel

            self._arrays = kernel.Slots(self.slots)
        return self._arrays

    def per_slot(self, path: str) -> dict[str, list[SparseDiff | None]]:
        """The torch path's form: each slot's decoded change of every tensor of module `path`."""
        if self._decoded is None:
            self._decoded = {}
        if path not in self._decoded:
            self._decoded[path] = {local: [c.sparse_diff(f"{path}.{local}") if t >= 0 else None
                                           for c, t in zip(self.slots, index)]
                                   for local, index in self.changed[path].items()}
        return self._decoded[path]

    def _check_batch(self, x: torch.Tensor, module: nn.Module) -> None:
        if x.shape[0] != self.batch:
            raise DiffpruneError(f"a {type(module).__name__} got {x.shape[0]} rows for a batch of {self.batch}: "
                                 "this model does not keep the batch first")

    # -- the hooks ------------------------------------------------------------------------------
    def _linear(self, m: nn.Linear, x: torch.Tensor, changed: dict) -> torch.Tensor:
        from diffprune.serving import kernel

        x, a = x.contiguous(), self.arrays()
        y = torch.empty(*x.shape[:-1], m.out_features)
        bias = m.bias.detach().numpy() if m.bias is not None else np.zeros(m.out_features, np.float32)
        kernel.run(kernel.linear_delta, x.view(self.batch, -1, m.in_features).numpy(),
                   y.view(self.batch, -1, m.out_features).numpy(), self._rows, changed.get("weight", self._none),
                   changed.get("bias", self._none), a.streams, a.bits, a.codes, a.tables, a.pow2, bias,
                   scratch_floats=(m.in_features + m.out_features) * kernel.TILE)
        y.view(-1, m.out_features).addmm_(x.view(-1, m.in_features), m.weight.detach().t())
        return y

    def _layer_norm(self, m: nn.LayerNorm, x: torch.Tensor, out: torch.Tensor, path: str,
                    changed: dict) -> torch.Tensor:
        self._check_batch(x, m)
        if not self._fast(out, x):
            return mixed_torch.layer_norm(m, x, self.per_slot(path), self.row_slots)
        from diffprune.serving import kernel

        y, a, size = out.contiguous(), self.arrays(), m.normalized_shape[0]
        kernel.run(kernel.norm_delta, x.contiguous().view(self.batch, -1, size).numpy(),
                   y.view(self.batch, -1, size).numpy(), m.eps, self._rows, changed.get("weight", self._none),
                   changed.get("bias", self._none), a.streams, a.bits, a.codes, a.tables, a.pow2)
        return y

    def _embedding(self, m: nn.Embedding, ids: torch.Tensor, out: torch.Tensor, path: str,
                   changed: dict) -> torch.Tensor:
        if ids.shape[0] not in (1, self.batch):  # position ids come as one row for the whole batch
            self._check_batch(ids, m)
        if not self._fast(out):
            return mixed_torch.embedding(m, ids, out, self.per_slot(path)["weight"], self.row_slots)
        from diffprune.serving import kernel

        y, a = out.expand(self.batch, *out.shape[1:]).contiguous(), self.arrays()
        ids = ids.reshape(ids.shape[0], -1).expand(self.batch, -1).to(torch.int64).contiguous()
        kernel.run(kernel.embedding_delta, ids.numpy(),
                   y.view(self.batch, -1, m.embedding_dim).numpy(), self._rows, changed["weight"], a.streams,
                   a.bits, a.codes, a.tables, a.checks, a.pow2)
        return y
