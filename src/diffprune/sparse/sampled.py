"""The gradient of a weight at a few fixed positions only: a sampled dense-dense product.

For y = x W^T over N tokens, dL/dW[o, i] = sum_n dy[n, o] x[n, i]. Training k fixed entries of
W (diff pruning's fixed-mask phase) needs those k sums, not the whole out x in matrix that
autograd's dense weight gradient computes (a third of a Linear layer's training work, and for
k at 0.5% of the entries about 200 times the products needed).

On the CPU (numba; float32, or bf16 / fp16 widened to it): dy and x are transposed once, so
that each entry is a dot product of two contiguous token vectors, vectorised; entries run in
parallel on torch's thread count. The transposes cost about (in + out) / (in * out) of the dense
product's memory traffic (measured: most of this path's time on MiniLM's FFN shapes).
Elsewhere: the same sums by gathering the k columns in chunks (bounded memory).
"""

from __future__ import annotations

import torch

from diffprune.sparse import kernel

_WIDENED = {torch.float32, torch.bfloat16, torch.float16}  # read by the CPU kernel as float32
_CHUNK_ELEMENTS = 2**24  # gathered columns per chunk on the torch path: 64 MiB of float32 per operand
_DOTS = None


def _compiled_dots():
    global _DOTS
    if _DOTS is None:
        nb = kernel.numba()

        # FMA and reassociation (the sum runs in vector lanes); no licence on NaN or infinities.
        @nb.njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "reassoc"})
        def dots(grad_t, inputs_t, out_index, in_index, result):
            for e in nb.prange(out_index.shape[0]):
                g, x = grad_t[out_index[e]], inputs_t[in_index[e]]
                acc = 0.0
                for n in range(g.shape[0]):
                    acc += g[n] * x[n]
                result[e] = acc

        _DOTS = dots
    return _DOTS


def sampled_weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor, out_index: torch.Tensor,
                        in_index: torch.Tensor) -> torch.Tensor:
    """result[e] = sum_n grad_out[n, out_index[e]] * inputs[n, in_index[e]] (float32, shape (k,)).

    grad_out: (N, out), inputs: (N, in), both 2-D; the indices int64 on their device."""
    if grad_out.device.type == "cpu" and {grad_out.dtype, inputs.dtype} <= _WIDENED:
        result = torch.empty(out_index.numel(), dtype=torch.float32)
        if result.numel():
            # One copy each, transposed and widened to float32 (bf16 / fp16 under autocast) at once.
            grad_t = torch.empty(grad_out.shape[::-1], dtype=torch.float32).copy_(grad_out.t())
            inputs_t = torch.empty(inputs.shape[::-1], dtype=torch.float32).copy_(inputs.t())
            dots = _compiled_dots()
            with kernel.pool(kernel.kernel_threads()):
                dots(grad_t.numpy(), inputs_t.numpy(), out_index.numpy(), in_index.numpy(), result.numpy())
        return result
    step = max(1, _CHUNK_ELEMENTS // max(1, grad_out.shape[0]))
    parts = [(grad_out.index_select(1, out_index[a:a + step]) * inputs.index_select(1, in_index[a:a + step]))
             .sum(0, dtype=torch.float32) for a in range(0, out_index.numel(), step)]
    return torch.cat(parts) if parts else grad_out.new_zeros(0, dtype=torch.float32)
