"""The fixed-mask phase's backward computes only the k gradients it trains.

In the fixed phase a diffed tensor is theta0 + scatter(values). Built with autograd, every
Linear's backward computes the dense gradient of its whole weight (a third of its training
work) and every embedding's the dense gradient of its whole table, only for the k entries to be
read back out of them. Here such a tensor is built without autograd, so the layer computes only
the input's gradient, and a forward hook on the layer puts an identity on its output whose
backward is the values' gradient at their positions alone (diffprune.sparse.sampled for a
Linear, a per-row sum over the tokens that looked a row up for an embedding).

Only layers whose computation is known exactly take this path: nn.Linear and nn.Embedding
themselves (not subclasses, which may compute otherwise), without max_norm, whose weight no
other module shares. Every other tensor keeps autograd's path; the gradients are the same.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch import nn

from diffprune.sparse.sampled import sampled_weight_grad


def sampled_owners(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """name -> the layer whose weight it is, for the diffed weights that can take this path."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    owners = {}
    for name in names:
        path, _, local = name.rpartition(".")
        module = modules.get(path)
        if module is None or local != "weight" or uses[id(module.weight)] != 1:
            continue
        if type(module) is nn.Linear or (type(module) is nn.Embedding and module.max_norm is None):
            owners[name] = module
    return owners


class _LinearValues(torch.autograd.Function):
    """Identity on a Linear's output; its backward adds d loss / d values at (out, in) positions."""

    @staticmethod
    def forward(ctx, output, inputs, values, out_index, in_index):
        ctx.save_for_backward(inputs, out_index, in_index)
        ctx.values_dtype = values.dtype  # the layer's output may be bf16 under autocast; the values are not
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        inputs, out_index, in_index = ctx.saved_tensors
        values_grad = sampled_weight_grad(grad.reshape(-1, grad.shape[-1]), inputs.reshape(-1, inputs.shape[-1]),
                                          out_index, in_index)
        return grad, None, values_grad.to(ctx.values_dtype), None, None


class _EmbeddingValues(torch.autograd.Function):
    """Identity on an embedding's output; its backward adds d loss / d values at (row, col)
    positions: the sum of the output gradient over the tokens that looked the row up."""

    @staticmethod
    def forward(ctx, output, ids, values, rows, cols, padding_idx):
        ctx.save_for_backward(ids, rows, cols)
        ctx.padding_idx, ctx.values_dtype = padding_idx, values.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ids, rows, cols = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        looked_up, token_row = ids.reshape(-1).unique(return_inverse=True)
        per_row = grad.new_zeros(looked_up.numel(), grad.shape[-1]).index_add_(0, token_row, grad)
        at = torch.searchsorted(looked_up, rows).clamp_(max=max(looked_up.numel() - 1, 0))
        hit = looked_up[at] == rows
        if ctx.padding_idx is not None:  # as nn.Embedding: the padding row never gets a gradient
            hit &= rows != ctx.padding_idx
        values_grad = torch.where(hit, per_row[at, cols], grad.new_zeros(()))
        return grad, None, values_grad.to(ctx.values_dtype), None, None, None


def _hook(module: nn.Module, values: torch.Tensor, positions: torch.Tensor):
    width = module.weight.shape[1]
    first, second = positions // width, positions % width
    if isinstance(module, nn.Linear):
        return lambda m, args, out: _LinearValues.apply(out, args[0].detach(), values, first, second)
    return lambda m, args, out: _EmbeddingValues.apply(out, args[0], values, first, second, module.padding_idx)


@contextmanager
def sampled_values_grad(changes: list[tuple[nn.Module, torch.Tensor, torch.Tensor]]):
    """Within the block, a forward through each (layer, values, flat positions) gives the values
    their gradient through the layer's output (the layer's weight built without autograd)."""
    handles = [module.register_forward_hook(_hook(module, values, positions)) for module, values, positions in changes]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
