"""theta = theta0 + delta over a frozen, shared base, with delta learned in three modes.

* "dense":  delta = w                          (non-adaptive diff pruning's first phase)
* "l0":     delta = z * z_group * w            (hard-concrete gates; z_group only if structured)
* "fixed":  delta = values scattered at a fixed set of k positions (after projection)

The wrapped HF model is called with `torch.func.functional_call`, so any architecture works and
nothing is forked or monkeypatched. The base parameters are used in place, never copied; what is
added is w, the gate logits, and (for the fixed phase) k values and their positions, all
allocated up front so that DDP sees every parameter from the start.

The input embedding is the biggest matrix (11.7M of MiniLM's 22.7M entries) and a batch reads a
few hundred of its rows, so gates and deltas are formed for those rows only: the loss does not
depend on the other rows, so this is exact, not an approximation.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call

from diffprune import gates
from diffprune.gates import GateShape
from diffprune.methods.diff.sparse_grad import sampled_owners, sampled_values_grad

MODES = ("dense", "l0", "fixed")


class DiffModel(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        k: int,
        *,
        structured: bool,
        gate_shape: GateShape = GateShape(),
        alpha_init: float = 5.0,
        mode: str = "l0",
        track_gate_velocity: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        self.gate_shape = gate_shape
        self.structured = structured
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].requires_grad_(False)
        self._theta0 = [params[n] for n in self.names]  # the base itself, not a copy
        embedding = _rows_only_embedding(model)
        self._embedding_index = next((i for i, p in enumerate(self._theta0) if p is embedding), None)
        self.w = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for p in self._theta0])
        self.log_alpha = nn.ParameterList([nn.Parameter(torch.full_like(p, alpha_init)) for p in self._theta0])
        self.group_log_alpha = nn.Parameter(torch.full((len(self.names),), alpha_init)) if structured else None
        # Fixed-mask state: k flat positions into the concatenation of the diffed tensors, grouped
        # by tensor (offsets[i]:offsets[i+1] belong to tensor i), and their trainable values.
        self.values = nn.Parameter(torch.zeros(k))
        self.register_buffer("positions", torch.zeros(k, dtype=torch.long))
        self.register_buffer("offsets", torch.zeros(len(self.names) + 1, dtype=torch.long))
        self.register_buffer("mode_index", torch.tensor(MODES.index(mode)))
        # Penalty weight and step of the density controller: buffers, so checkpoints carry them.
        self.register_buffer("l0_lambda", torch.tensor(0.0, dtype=torch.float64))
        # Fraction of nonzero entries of z * w just before projection (-1: not projected yet).
        self.register_buffer("learned_density", torch.tensor(-1.0, dtype=torch.float64))
        # The gate logits' moving average, flat in gate_logits() order, for a controller that
        # steers on their velocity (budget.LogitTrend); empty unless asked for.
        gate_entries = sum(a.numel() for a in self.gate_logits()) if track_gate_velocity else 0
        self.register_buffer("logit_average", torch.zeros(gate_entries))
        self.numels = [p.numel() for p in self._theta0]
        self._sampled_owners = sampled_owners(model, self.names)  # a plain dict: not submodules
        self.total = sum(self.numels)
        self.set_mode(mode)

    @property
    def mode(self) -> str:
        return MODES[int(self.mode_index)]

    def set_mode(self, mode: str) -> None:
        """Which tensors train: w alone (dense), w and the gates (l0), or the k values (fixed)."""
        self.mode_index.fill_(MODES.index(mode))
        for p in self.w:
            p.requires_grad_(mode in ("dense", "l0"))
        for p in self.gate_logits():
            p.requires_grad_(mode == "l0")
        self.values.requires_grad_(mode == "fixed")

    def gate_logits(self) -> list[nn.Parameter]:
        """Every gate logit tensor: one per diffed tensor, then the group logits (structured only)."""
        return [*self.log_alpha] + ([self.group_log_alpha] if self.structured else [])

    def logit_averages(self) -> list[torch.Tensor]:
        """Views into the `logit_average` buffer shaped as gate_logits() (empty if not tracked)."""
        if not self.logit_average.numel():
            return []
        logits = self.gate_logits()
        parts = self.logit_average.split([a.numel() for a in logits])
        return [part.view_as(a) for part, a in zip(parts, logits)]

    # -- the effective parameters --------------------------------------------------------
    def _gate(self, alpha: torch.Tensor) -> torch.Tensor:
        return gates.gate(alpha, self.gate_shape, self.training)

    def deltas(self, input_ids: torch.Tensor | None = None) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """Per diffed tensor: (rows or None, delta of those rows or of the whole tensor)."""
        mode = self.mode
        if mode == "fixed":
            raise RuntimeError("deltas() is for the dense and L0 modes")
        group = self._gate(self.group_log_alpha) if self.structured and mode == "l0" else None
        out = []
        for i, (w, alpha) in enumerate(zip(self.w, self.log_alpha)):
            rows = None
            if i == self._embedding_index and input_ids is not None:
                rows = input_ids.unique()
                w, alpha = w[rows], alpha[rows]
            delta = w if mode == "dense" else self._gate(alpha) * w
            if group is not None:
                delta = delta * group[i]
            out.append((rows, delta))
        return out

    def effective_parameters(self, input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.mode == "fixed":
            return self._fixed_parameters(sample=False)[0]
        params = {}
        for name, theta0, (rows, delta) in zip(self.names, self._theta0, self.deltas(input_ids)):
            params[name] = theta0 + delta if rows is None else theta0.index_put((rows,), theta0[rows] + delta)
        return params

    def _fixed_parameters(self, sample: bool) -> tuple[dict[str, torch.Tensor], list]:
        """The tensors with their k values added, and (with `sample`) the (layer, values,
        positions) whose values get their gradient from the layer's output alone (sparse_grad:
        only within sampled_values_grad) rather than through the tensors."""
        params, sampled, offsets = {}, [], self.offsets.tolist()
        # Measured on the CPU only (the dense weight gradient is what a GPU does best).
        sampling = sample and torch.is_grad_enabled() and self.values.requires_grad and self.values.device.type == "cpu"
        start_of = 0
        for i, (name, theta0) in enumerate(zip(self.names, self._theta0)):
            a, b = offsets[i], offsets[i + 1]
            if b > a:  # tensors without a change are used as they are: no copy
                local, values = self.positions[a:b] - start_of, self.values[a:b]
                owner = self._sampled_owners.get(name) if sampling else None
                if owner is not None:
                    sampled.append((owner, values, local))
                    values = values.detach()
                params[name] = theta0.reshape(-1).index_add(0, local, values).view_as(theta0)
            start_of += self.numels[i]
        return params, sampled

    def forward(self, **batch):
        if self.mode != "fixed":
            return functional_call(self.model, self.effective_parameters(batch.get("input_ids")), args=(),
                                   kwargs=batch, strict=False)
        params, sampled = self._fixed_parameters(sample=True)
        with sampled_values_grad(sampled):
            return functional_call(self.model, params, args=(), kwargs=batch, strict=False)

    # -- the L0 penalty ------------------------------------------------------------------
    def expected_l0(self, group_penalty: str = "product") -> torch.Tensor:
        """sum_i P(z_i != 0) [* P(z_group != 0)]: the paper's product form, or the reference
        code's additive form (each tensor's entries plus its group gate)."""
        total = self.values.new_zeros(())
        group = gates.prob_nonzero(self.group_log_alpha, self.gate_shape) if self.structured else None
        for i, alpha in enumerate(self.log_alpha):
            entries = gates.prob_nonzero(alpha, self.gate_shape).sum()
            if group is None:
                total = total + entries
            elif group_penalty == "product":
                total = total + entries * group[i]
            else:
                total = total + entries + group[i]
        return total

    @torch.no_grad()
    def expected_density(self, log_alpha: Iterable[torch.Tensor] | None = None,
                         group_log_alpha: torch.Tensor | None = None) -> float:
        """The expected share of nonzero entries at the gates' logits, or at others given (e.g.
        where the gates are heading); an iterable of entry logits is read one tensor at a time."""
        log_alpha = self.log_alpha if log_alpha is None else log_alpha
        group_log_alpha = self.group_log_alpha if group_log_alpha is None else group_log_alpha
        group = gates.prob_nonzero(group_log_alpha, self.gate_shape) if self.structured else None
        total = 0.0
        for i, alpha in enumerate(log_alpha):
            p = gates.prob_nonzero(alpha, self.gate_shape).sum().item()
            total += p * (group[i].item() if group is not None else 1.0)
        return total / self.total

    @torch.no_grad()
    def lower_gates_to(self, density: float, tolerance: float = 1e-3) -> float:
        """Lower every entry gate logit by the same amount c >= 0, the one that puts the expected
        density at `density` (never raising it), and return c. The logits keep their order, so
        which entries stay open is what the task taught the gates; only how many is set here.

        Solved by Newton's method on log density, which is nearly linear in c once most gates are
        in the sigmoid's tail (two or three passes over the logits), kept inside a bisection
        bracket so that it always converges."""
        group = gates.prob_nonzero(self.group_log_alpha, self.gate_shape) if self.structured else None

        def log_density(c: float) -> tuple[float, float]:
            """log E[density] after lowering the logits by c, and its derivative in c."""
            value = slope = 0.0
            for i, alpha in enumerate(self.log_alpha):
                p = gates.prob_nonzero(alpha - c, self.gate_shape).reshape(-1)
                weight = float(group[i]) if group is not None else 1.0
                mass = float(p.sum(dtype=torch.float64))
                value += weight * mass
                slope -= weight * (mass - float(p.dot(p)))  # d/dc sum(p) = -sum(p (1 - p))
            return math.log(max(value / self.total, 1e-300)), slope / max(value, 1e-300)

        goal = math.log(density)
        now, slope = log_density(0.0)
        if now <= goal + tolerance:
            return 0.0
        low, high, c = 0.0, math.inf, 0.0
        for _ in range(60):
            if abs(now - goal) <= tolerance:
                break
            low, high = (c, high) if now > goal else (low, c)
            newton = c - (now - goal) / slope if slope < 0 else math.inf
            c = newton if low < newton < high else (low + high) / 2 if high < math.inf else 2 * c + 1
            now, slope = log_density(c)
        for alpha in self.log_alpha:
            alpha.sub_(c)
        return c

    @torch.no_grad()
    def fraction_of_gates_above(self, logit: float) -> float:
        """Share of entry gates whose logit rose above `logit`: open gates the task keeps pushing
        further open, where the penalty's gradient (the sigmoid's slope) fades exponentially."""
        return sum(int((a > logit).sum()) for a in self.log_alpha) / self.total

    # -- fixing the pattern ----------------------------------------------------------------
    @torch.no_grad()
    def fix(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Enter the fixed mode with these sorted global positions and their starting values."""
        positions = positions.to(self.positions.device)
        if positions.numel() != self.positions.numel():
            raise ValueError(f"expected {self.positions.numel()} positions, got {positions.numel()}")
        if not bool((positions[1:] > positions[:-1]).all()):  # the offsets below need them sorted and distinct
            raise ValueError("the positions must be sorted and distinct")
        if positions.numel() and not 0 <= int(positions[0]) <= int(positions[-1]) < self.total:
            raise ValueError(f"positions must lie in [0, {self.total})")
        bounds = torch.tensor([0] + self.numels, device=positions.device).cumsum(0)
        self.positions.copy_(positions)
        self.offsets.copy_(torch.searchsorted(positions, bounds))
        self.values.copy_(values)
        self.set_mode("fixed")

    @torch.no_grad()
    def sparse_deltas(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (flat positions within the tensor, values), for the fixed mode."""
        out, offsets, start_of = {}, self.offsets.tolist(), 0
        for i, name in enumerate(self.names):
            a, b = offsets[i], offsets[i + 1]
            if b > a:
                out[name] = (self.positions[a:b] - start_of, self.values[a:b].detach().clone())
            start_of += self.numels[i]
        return out


def _rows_only_embedding(model: nn.Module) -> nn.Parameter | None:
    """The input embedding matrix, if the loss depends only on the rows a batch looks up. Not
    if it is tied to an output projection that reads every row (a language-model head), nor in
    an encoder-decoder, whose decoder also reads rows that are not in input_ids (its start token)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is embedding.weight:
        return None
    return embedding.weight
