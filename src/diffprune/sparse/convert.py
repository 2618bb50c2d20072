"""`sparsify(model)`: swap every pruned nn.Linear of a model for a SparseLinear, then fuse the
encoder layers whose Linears all run sparse (fuse.py), in place.

Only modules are swapped (the transformers code runs as it is). A layer becomes sparse only
where that is measured to pay: its dense and sparse forms are timed on this machine, at the
batch and length given, alternating, and the faster one is kept. So a converted model is not
made slower by its conversion, and a layer whose sparsity is too low for the kernel stays an
exact, untouched nn.Linear (so does one where sparse wins by less than 5%: a near tie is not
worth the rounding differences).

Threads. In a model, a converted layer's kernel runs on one thread (SparseLinear.threads),
whatever torch uses: between two kernels torch's own ops run on its OpenMP threads, which then
spin-wait for their next op on the cores a second kernel thread needs, so that thread gains
nothing there (MiniLM at 95%, 1 x 128, torch on 2 threads, one and two kernel threads
alternating in one process: 9.0 against 10.1 ms and 12.3 against 13.1; at 80% 21.4 against 22.3;
measured), while it disturbs the torch ops after it. A layer is timed as it will run: the
sparse form on one thread, the dense one on torch's threads. A fused layer has no torch op
inside and runs on all of torch's threads (fuse.py).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from diffprune.errors import DiffpruneError, DiffpruneWarning
from diffprune.sparse.linear import SparseLinear
from diffprune.sparse.timing import time_in_blocks, token_inputs

CHOICES = ("measure", "sparse")
# Sparse must win by this much: a near tie is left dense, exact and with nothing to lose.
MARGIN = 0.95


@dataclass
class LayerChoice:
    """What sparsify did with one Linear: its density, the two timings (µs; None when not
    timed) and the form it kept."""

    name: str
    shape: tuple[int, int]
    density: float
    dense_us: float | None
    sparse_us: float | None
    kept: str  # "sparse" or "dense"


@dataclass
class SparsifyReport:
    tokens: int
    threads: int
    layers: list[LayerChoice] = field(default_factory=list)
    fused_layers: list[str] = field(default_factory=list)  # encoder layers run as one fused call each
    model_ms: dict[str, float] | None = None  # the model's fastest call, Linear by Linear and fused

    @property
    def sparse_layers(self) -> list[LayerChoice]:
        return [layer for layer in self.layers if layer.kept == "sparse"]

    def summary(self) -> str:
        pruned = [layer for layer in self.layers if layer.density < 1]
        if not pruned:
            return "no pruned Linear layer: the model runs dense"
        fused = self.fused_layers
        return (f"{len(self.sparse_layers)} of {len(pruned)} pruned Linear layers run sparse "
                f"(timed at {self.tokens} tokens; the rest stay dense, as fast or faster there)"
                + (f"; {len(fused)} encoder layers run as one fused call each" if fused else ""))

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "threads": self.threads, "layers": [asdict(layer) for layer in self.layers],
                "fused_layers": self.fused_layers, "model_ms": self.model_ms}


def sparsify(model: nn.Module, *, batch_size: int = 1, length: int = 128, choose: str = "measure",
             repeats: int = 9) -> SparsifyReport:
    """Replace, in place, each nn.Linear holding zeros whose sparse form runs faster (`choose=
    "measure"`, timed at `batch_size` x `length` tokens) or every one (`choose="sparse"`).

    Returns what was done per layer. A model with no zero in any Linear weight is left as it is,
    with a warning. A weight holding NaN or infinity is refused before anything is swapped.
    """
    if choose not in CHOICES:
        raise DiffpruneError(f"choose must be one of {', '.join(CHOICES)}, not {choose!r}")
    if batch_size < 1 or length < 1:
        raise DiffpruneError(f"batch size and length must be at least 1 (got {batch_size} and {length})")
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, m in linears:
        if not torch.isfinite(m.weight).all() or (m.bias is not None and not torch.isfinite(m.bias).all()):
            raise DiffpruneError(f"the Linear layer {name} holds NaN or infinite values; nothing was converted")
    report = SparsifyReport(tokens=batch_size * length, threads=torch.get_num_threads())
    with torch.no_grad():
        for name, linear in linears:
            report.layers.append(_convert(model, name, linear, report.tokens, choose, repeats))
        _fuse(model, report, batch_size, length, choose, repeats)
    if not any(layer.density < 1 for layer in report.layers):
        warnings.warn(DiffpruneWarning("the model has no pruned Linear layer (no weight holds a zero); "
                                       "it runs dense, unchanged"), stacklevel=2)
    return report


def _convert(model: nn.Module, name: str, linear: nn.Linear, tokens: int, choose: str, repeats: int) -> LayerChoice:
    density = float((linear.weight != 0).float().mean())
    shape = (linear.out_features, linear.in_features)
    if density == 1.0:
        return LayerChoice(name, shape, density, None, None, "dense")
    sparse = SparseLinear.from_linear(linear)
    sparse.threads = 1
    dense_us = sparse_us = None
    if choose == "measure":
        dense_us, sparse_us = _time_pair(linear, sparse, tokens, repeats)
        if sparse_us >= MARGIN * dense_us:
            return LayerChoice(name, shape, density, dense_us, sparse_us, "dense")
    _swap(model, name, sparse)
    return LayerChoice(name, shape, density, dense_us, sparse_us, "sparse")


def _time_pair(dense: nn.Module, sparse: nn.Module, tokens: int, repeats: int) -> tuple[float, float]:
    """Fastest µs of each, called alternately on the same random inputs, after one warm-up call
    each. Other work on the machine only ever adds time, so the fastest call is the closest to
    each form's own cost, and alternating makes a burst of load fall on both alike."""
    # A new input per call, as in a model: nothing of the last call's input waits in the cache.
    inputs = [torch.randn(tokens, dense.in_features) for _ in range(repeats + 1)]
    times: dict[nn.Module, list[float]] = {dense: [], sparse: []}
    for layer in (dense, sparse):
        layer(inputs[-1])
    for x in inputs[:-1]:
        for layer in (dense, sparse):
            start = time.perf_counter()
            layer(x)
            times[layer].append((time.perf_counter() - start) * 1e6)
    return min(times[dense]), min(times[sparse])


def _fuse(model: nn.Module, report: SparsifyReport, batch_size: int, length: int, choose: str, repeats: int) -> None:
    """Fuse the encoder layers of the fused form whose Linears all hold zeros (fuse.py), where
    `choose` is "sparse" or where the model with them fused is measured faster than the model
    as converted Linear by Linear. Whole models are timed, in blocks of calls (timing.py): a
    fused layer's speed depends on what ran before it (torch's threads, spinning after their
    ops, take the cores it needs), which timing layers one by one gets wrong."""
    from diffprune.sparse.fuse import FusedEncoderLayer, as_fused, fusable_when_sparse, fuse

    names = [n for n, m in model.named_modules() if not isinstance(m, FusedEncoderLayer) and fusable_when_sparse(m)]
    if not names:
        return
    # Measuring needs both models; otherwise the model itself is fused (no copy to make).
    fused = copy.deepcopy(model) if choose == "measure" else model
    for name in names:
        fuse(fused, name, as_fused(fused.get_submodule(name)))
    if choose == "measure":
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1000)
        inputs = token_inputs(vocab, batch_size, length)
        try:
            times = time_in_blocks({"linears": lambda: model(**inputs), "fused": lambda: fused(**inputs)}, repeats)
        except TypeError:  # not a model called with token ids: nothing to time it on, left unfused
            return
        report.model_ms = {k: min(t) for k, t in times.items()}
        if report.model_ms["fused"] >= MARGIN * report.model_ms["linears"]:
            return
        for name in names:
            fuse(model, name, fused.get_submodule(name))
    report.fused_layers = names
    for choice in report.layers:  # the fused layers' Linears all run sparse, inside the fused call
        if any(choice.name.startswith(name + ".") for name in names) and choice.density < 1:
            choice.kept = "sparse"


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def sparsify_for_eval(model: nn.Module, batch_size: int, length: int) -> SparsifyReport:
    """sparsify before scoring a dev set, said on stderr. The layers are timed on at most
    1,024 tokens (the choice barely moves beyond that, and timing a whole 128 x 128 batch per
    layer would cost more than the scoring saves)."""
    import click

    if next(model.parameters()).device.type != "cpu":
        raise DiffpruneError("sparse inference runs on the CPU; this model is on "
                             f"{next(model.parameters()).device}")
    report = sparsify(model, batch_size=max(1, min(batch_size, 1024 // max(1, length))), length=length)
    click.echo(f"sparse: {report.summary()}", err=True)
    return report
