"""The CPU kernel of mixed batches: every row's own sparse weight delta added into a Linear's
output in place, in the activations' own layout (numba).

For batch row b, whose task's delta has entries (o_e, i_e, v_e) for e in [start[b], end[b]):
y[b, t, o_e] += v_e * x[b, t, i_e] for every token t. Eight tokens at a time, their input and
output rows stay in the first-level cache while the entries run over them, each entry read once
per eight tokens; no activation is transposed or copied (measured on 16 rows x 64 tokens at 0.5%:
2.5 to 3x faster than one token at a time, and than transposing each row for a contiguous
multiply-add over its tokens, whose copies cost more than the products). Rows run in parallel
(numba's prange) on as many threads as torch uses.
"""

from __future__ import annotations

import os
import threading

import torch

_KERNEL = None
_LOCK = threading.Lock()  # numba's workqueue pool takes one parallel call at a time


def _compiled():
    global _KERNEL
    if _KERNEL is None:
        import numba as nb

        if "NUMBA_THREADING_LAYER" not in os.environ:  # threads that sleep between calls, beside torch's
            nb.config.THREADING_LAYER = "workqueue"

        @nb.njit(parallel=True, nogil=True, cache=True, fastmath={"contract"})
        def add_row_deltas(x, y, out_index, in_index, values, start, end):
            tokens = x.shape[1]
            for b in nb.prange(x.shape[0]):
                xb, yb = x[b], y[b]
                t = 0
                while t + 8 <= tokens:  # each entry read once for eight tokens
                    for e in range(start[b], end[b]):
                        o, i, w = out_index[e], in_index[e], values[e]
                        yb[t, o] += w * xb[t, i]
                        yb[t + 1, o] += w * xb[t + 1, i]
                        yb[t + 2, o] += w * xb[t + 2, i]
                        yb[t + 3, o] += w * xb[t + 3, i]
                        yb[t + 4, o] += w * xb[t + 4, i]
                        yb[t + 5, o] += w * xb[t + 5, i]
                        yb[t + 6, o] += w * xb[t + 6, i]
                        yb[t + 7, o] += w * xb[t + 7, i]
                    t += 8
                for u in range(t, tokens):
                    for e in range(start[b], end[b]):
                        yb[u, out_index[e]] += values[e] * xb[u, in_index[e]]

        _KERNEL = add_row_deltas
    return _KERNEL


def available(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def add_row_deltas(x: torch.Tensor, y: torch.Tensor, out_index: torch.Tensor, in_index: torch.Tensor,
                   values: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> None:
    """y (batch, tokens, out) += each row's delta times x (batch, tokens, in), in place."""
    kernel = _compiled()
    threads = torch.get_num_threads()
    with _LOCK:
        import numba as nb

        nb.set_num_threads(min(threads, nb.config.NUMBA_NUM_THREADS))
        kernel(x.numpy(), y.numpy(), out_index.numpy(), in_index.numpy(), values.numpy(), start.numpy(),
               end.numpy())

