"""Fused encoder layers (sparsify makes them, convert.py): each BERT-style encoder layer whose
six Linear layers all run sparse becomes one compiled call (encoder_kernel.py), with no torch op
inside it.

A layer qualifies by what it holds, not by its class name: self-attention of query, key and
value SparseLinears with absolute positions (no relative-position tables), an output SparseLinear
and LayerNorm, an intermediate SparseLinear whose activation is the exact GELU (checked by
evaluating it), an output SparseLinear and LayerNorm; no cross-attention. BERT, RoBERTa,
ELECTRA, XLM-R and MiniLM layers are of this form; any other layer runs as transformers wrote it.

The fused layer keeps the layer's submodules under their own names (the state dict is the same)
and falls back to the layer's own forward pass wherever it would differ: training mode, a cache,
cross-attention inputs, or a mask of a shape it does not know.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import torch
from torch import nn

from diffprune.sparse import kernel
from diffprune.sparse.linear import SparseLinear

HEAD_DIMS = (16, 32, 64)  # encoder_kernel.HEAD_DIMS (that module compiles on import)
# Per calling thread: the thread counts of the fused models whose forward passes are running.
_RUNNING = threading.local()


def _enter(model, args) -> None:
    """Before a fused model's forward pass: its layers take torch's thread count, and torch's
    own ops (embeddings, pooler, head: a few percent of the time) run on one thread meanwhile,
    because torch's OpenMP threads spin for milliseconds after each op on the cores the fused
    layers need next (MiniLM at 95%, 2 threads: its first three layers took 2.1 instead of
    1.2 ms; measured). A layer left unfused runs on one thread too: sparsify keeps the fused
    layers only where the whole model is measured faster with them."""
    if not hasattr(_RUNNING, "threads"):
        _RUNNING.threads = []
    _RUNNING.threads.append(torch.get_num_threads())
    torch.set_num_threads(1)


def _leave(model, args, output) -> None:
    """After it, whether it returned or raised: torch's thread count as it was."""
    torch.set_num_threads(_RUNNING.threads.pop())


def layer_threads() -> int:
    """The threads a fused layer runs on: its model's (see _enter), or torch's when called alone."""
    running = getattr(_RUNNING, "threads", None)
    return min(running[-1], kernel.max_threads()) if running else kernel.kernel_threads()


def _is_exact_gelu(act) -> bool:
    probe = torch.linspace(-6, 6, 97)
    try:
        with torch.no_grad():
            return bool(torch.allclose(act(probe), nn.functional.gelu(probe), atol=1e-6, rtol=0))
    except Exception:  # an activation that does not take a tensor is not GELU
        return False


def _linear_slots(layer: nn.Module) -> list[tuple[nn.Module | None, str]]:
    """(owner, attribute) of the six Linear layers of the fused form: query, key, value,
    attention output, intermediate, output (owners None where the layer lacks them)."""
    attention = getattr(layer, "attention", None)
    own, attention_out = getattr(attention, "self", None), getattr(attention, "output", None)
    return [(own, "query"), (own, "key"), (own, "value"), (attention_out, "dense"),
            (getattr(layer, "intermediate", None), "dense"), (getattr(layer, "output", None), "dense")]


def _linears_of(layer: nn.Module) -> list:
    return [getattr(owner, attr, None) for owner, attr in _linear_slots(layer)]


def fusable(layer: nn.Module) -> bool:
    """Whether `layer` has the form encoder_kernel.encoder_layer computes, every Linear sparse."""
    linears = _linears_of(layer)
    if not all(isinstance(m, SparseLinear) for m in linears):
        return False
    own, hidden = layer.attention.self, linears[0].in_features
    norms = [getattr(m, "LayerNorm", None) for m in (layer.attention.output, layer.output)]
    inner = linears[4].out_features
    return ([(m.in_features, m.out_features) for m in linears]
            == [(hidden, hidden)] * 4 + [(hidden, inner), (inner, hidden)]
            and all(isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None for n in norms)
            and len({m.indices.dtype for m in linears[:3]}) == 1
            and isinstance(getattr(own, "num_attention_heads", None), int)
            and own.query.out_features // own.num_attention_heads in HEAD_DIMS
            and getattr(own, "position_embedding_type", "absolute") == "absolute"
            and not hasattr(own, "distance_embedding")
            and not hasattr(layer, "crossattention")
            and _is_exact_gelu(getattr(layer.intermediate, "intermediate_act_fn", None)))


class FusedEncoderLayer(nn.Module):
    """An encoder layer computed by one compiled call; same submodules, same outputs (to float32
    rounding) as the layer it replaces."""

    def __init__(self, layer: nn.Module, returns_tuple: bool) -> None:
        super().__init__()
        self.attention, self.intermediate, self.output = layer.attention, layer.intermediate, layer.output
        self._layer = (layer,)  # a tuple: not registered again, its modules are ours already
        self._returns_tuple = returns_tuple
        self.train(layer.training)
        self._plan: tuple | None = None
        own = layer.attention.self
        self.heads = int(own.num_attention_heads)
        self.scale = float(getattr(own, "scaling", (self.attention.self.query.out_features // self.heads) ** -0.5))

    def _linears(self) -> list[SparseLinear]:
        return _linears_of(self)

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        # Anything the fused call does not compute as the layer would goes to the layer itself
        # (a gradient, for one: its SparseLinears then refuse it).
        mask = self._additive_mask(attention_mask, hidden_states) if hidden_states.dim() == 3 else None
        if (mask is None or self.training or hidden_states.dtype is not torch.float32
                or hidden_states.device.type != "cpu" or (hidden_states.requires_grad and torch.is_grad_enabled())
                or any(a is not None for a in args) or kwargs.get("cache") is not None
                or kwargs.get("past_key_values") is not None or kwargs.get("output_attentions")):
            return self._layer[0](hidden_states, attention_mask, *args, **kwargs)
        out = self._fused(hidden_states.contiguous(), mask)
        return (out,) if self._returns_tuple else out

    @staticmethod
    def _additive_mask(mask, hidden_states) -> torch.Tensor | None:
        """transformers' mask as (sequences, 1 or queries, keys) float32 to add to the scores,
        or None where its shape is not one of the broadcast forms of (batch, 1, queries, keys)."""
        batch, seq = hidden_states.shape[:2]
        if mask is None:
            return torch.zeros(batch, 1, seq)
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != seq or mask.shape[2] not in (1, seq) \
                or mask.shape[0] not in (1, batch):
            return None
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        queries = mask.shape[2]
        return mask.to(torch.float32).expand(batch, 1, queries, seq).reshape(batch, queries, seq).contiguous()

    def _tensors(self) -> list[torch.Tensor]:
        norms = (self.attention.output.LayerNorm, self.output.LayerNorm)
        return [t for m in self._linears() for t in (m.indptr, m.indices, m.values, m.bias)] + [
            t for n in norms for t in (n.weight, n.bias)]

    def _weights(self, threads: int) -> tuple:
        """The kernel's arguments made of the weights (numpy views, row blocks for `threads`),
        made again only when a tensor was replaced (a load or `.to()`), as SparseLinear does."""
        tensors = self._tensors()
        where = (threads, *(t.data_ptr() if t is not None else 0 for t in tensors))
        if self._plan is None or self._plan[0] != where:
            mats = tuple((*m._arrays(), m._row_cuts(threads)) for m in self._linears())
            norms = tuple(tuple(t.detach().numpy() for t in pair) for pair in (tensors[-4:-2], tensors[-2:]))
            eps = (self.attention.output.LayerNorm.eps, self.output.LayerNorm.eps)
            self._plan = (where, (mats[:3], *mats[3:], norms, np.array([self.scale, *eps], np.float32)))
        return self._plan[1]

    def _fused(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from diffprune.sparse import encoder_kernel

        batch, seq, width = hidden_states.shape
        tokens, threads = batch * seq, layer_threads()
        x = hidden_states.reshape(tokens, width)
        out = torch.empty_like(x)
        qkv, attn_out, up, down, norms, consts = self._weights(threads)
        tile, inner = kernel.tile_width(tokens), up[0].size - 1
        with kernel.pool(threads):
            attention = encoder_kernel.attention_floats(seq, width // self.heads)
            scratch = kernel.scratch(max((width + inner) * tile, attention))
            work = kernel.workspace(encoder_kernel.work_floats(tokens, width, inner))
            encoder_kernel.encoder_layer(x.numpy(), out.numpy(), mask.numpy(), qkv, attn_out, up, down, norms,
                                         consts, seq, self.heads, work, scratch, kernel.positions(max(seq, width)),
                                         tile, threads)
        return out.reshape(batch, seq, width)


def fusable_when_sparse(layer: nn.Module) -> bool:
    """Whether `layer` would be fusable with its six Linear layers sparse: each one sparse or
    a Linear holding zeros, and the rest of the form right."""
    linears = _linears_of(layer)
    if not all(isinstance(m, SparseLinear) or (type(m) is nn.Linear and bool((m.weight == 0).any())) for m in linears):
        return False
    return fusable(as_fused(copy.deepcopy(layer)))


def as_fused(layer: nn.Module) -> nn.Module:
    """`layer` with each of its six Linear layers a SparseLinear, in place; gives the layer."""
    for owner, attr in _linear_slots(layer):
        linear = getattr(owner, attr)
        if type(linear) is nn.Linear:
            setattr(owner, attr, SparseLinear.from_linear(linear))
    return layer


def fuse(model: nn.Module, name: str, layer: nn.Module | None = None) -> None:
    """Replace the layer `name` of `model`, in place, by `layer` (by default the layer itself;
    fusable, or fused already), as a FusedEncoderLayer."""
    layer = model.get_submodule(name) if layer is None else layer
    if not isinstance(layer, FusedEncoderLayer):
        with torch.no_grad():  # what the layer returns, a tensor or a tuple, the fused one returns
            probe = layer(torch.zeros(1, 1, layer.attention.self.query.in_features))
        layer = FusedEncoderLayer(layer, isinstance(probe, tuple))
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)
    if not getattr(model, "_diffprune_fused", False):
        model.register_forward_pre_hook(_enter)
        model.register_forward_hook(_leave, always_call=True)
        model._diffprune_fused = True
