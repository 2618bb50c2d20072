"""Diff pruning (Guo, Rush, Kim 2021) and its non-adaptive baseline, as registered methods.

diff / diff-struct: an L0 phase (w and hard-concrete gates, plus a group gate per tensor for
the structured variant), the projection of z * w to exactly k entries, then a fixed-mask phase
that trains only those k values. nonadaptive: finetune a dense diff, keep its top-k by
magnitude, optionally finetune those k values.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError
from diffprune.gates import GateShape, prob_nonzero
from diffprune.methods.artifact import PATCH_FILE, head_state, load_patched, patch_meta, patch_summary, save_patch
from diffprune.methods.diff.model import DiffModel
from diffprune.methods.diff.options import DiffOptions, NonAdaptiveOptions, PatchOptions
from diffprune.methods.diff.steering import DensitySteering
from diffprune.methods.registry import Method, register
from diffprune.patch import TaskPatch
from diffprune.patch.taskpatch import VALUE_DTYPES
from diffprune.pruning.schedule import cubic_schedule
from diffprune.pruning.topk import budget_count, budget_fraction, keep_largest, top_positions
from diffprune.training.phases import ParamGroup, Phase, decay_split, head_groups
from diffprune.training.settings import TrainSettings


def diffed_names(base: BaseModel, include: str, exclude: str) -> list[str]:
    inc = [p for p in include.split(",") if p.strip()] or ["*"]
    exc = [p for p in exclude.split(",") if p.strip()]
    names = [n for n in base.base_names
             if any(fnmatch.fnmatch(n, p.strip()) for p in inc) and not any(fnmatch.fnmatch(n, p.strip()) for p in exc)]
    if not names:
        raise DiffpruneError(f"no base parameter matches --diff-include '{include}' minus --diff-exclude '{exclude}'")
    return names


def default_fixed_lr(lr: float, budget_fraction: float) -> float:
    """The fixed-mask phase's rate when --fixed-lr is not given: 5 x --lr at a 0.5% budget or
    more, rising as the budget shrinks to 15 x --lr at 0.1% and below.

    A smaller patch has to carry the same change of function in fewer entries, so each entry
    moves further, and Adam's step per entry is about the rate. Measured on MiniLM at 0.1%
    (benchmarks/README.md): 3 x the 0.5% rate raised the median of two seeds on STS-B from
    84.3 to 85.7, on MRPC from 85.2 to 86.8 and on RTE from 52.7 to 53.1. At 0.5% and
    above the rate stays the one measured there, and the rise is capped at the 3x measured."""
    return 5 * lr * min(3.0, max(1.0, 0.005 / budget_fraction))


def projection_scores(model: DiffModel, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """|delta| ranks first (the paper). Should fewer than k entries be nonzero (gates closed
    beyond the budget), the rest of the budget goes to the largest expected changes
    |w| * P(z != 0) [* P(z_group != 0)] instead of to arbitrary zero entries."""
    fallback = [w.detach().abs() for w in model.w]
    if model.mode == "l0":
        with torch.no_grad():
            group = prob_nonzero(model.group_log_alpha, model.gate_shape) if model.structured else None
            fallback = [f * prob_nonzero(a, model.gate_shape) * (group[i] if group is not None else 1)
                        for i, (f, a) in enumerate(zip(fallback, model.log_alpha))]
    offset = max(float(f.max()) for f in fallback) + 1.0
    # float64: adding the offset in float32 would round small |delta| into ties.
    return [torch.where(d != 0, d.double().abs() + offset, f.double()) for d, f in zip(deltas, fallback)]


class _DiffBase(Method):
    Config = PatchOptions
    artifact = PATCH_FILE
    # FSDP would shard the frozen base under DiffModel's functional_call and its per-entry w,
    # gates and k positions, which the projection reads whole; DDP keeps them whole.
    fsdp_refused = ("its diff and gates sit beside the frozen base and are read whole by the projection; "
                    "launch it with DDP (accelerate launch without an FSDP config, or torchrun)")
    structured = False
    mode = "l0"

    def prepare(self, base: BaseModel) -> nn.Module:
        c = self.config
        k = budget_count(c.budget, base.num_base_params)
        if c.budget_counts_head:
            k -= sum(p.numel() for p in base.head_parameters().values())
            if k < 1:
                raise DiffpruneError("--budget-counts-head: the head alone is larger than the budget")
        # The head trains; every base tensor stays frozen (the diffed ones change through DiffModel's
        # delta, and those left out by --diff-include / --diff-exclude do not change at all).
        for name, p in base.model.named_parameters():
            p.requires_grad_(name in base.head_names)
        names = diffed_names(base, c.diff_include, c.diff_exclude)
        self.k = min(k, sum(base.model.get_parameter(n).numel() for n in names))
        return DiffModel(base.model, names, self.k, structured=self.structured, mode=self.mode, **self._gates())

    def _gates(self) -> dict[str, Any]:
        """DiffModel's gate settings (the defaults for a method that does not learn gates)."""
        return {}

    def _deterministic_projection(self) -> bool:
        return False

    # -- phases --------------------------------------------------------------------------
    def _fixed_phase(self, model: DiffModel, base: BaseModel, s: TrainSettings) -> Phase:
        c, lr = self.config, self.lr(s)
        fraction = budget_fraction(c.budget, base.num_base_params)
        fixed_lr = c.fixed_lr if c.fixed_lr is not None else default_fixed_lr(lr, fraction)
        head_lr = s.head_lr if s.head_lr is not None else fixed_lr
        epochs = c.fixed_epochs if c.fixed_epochs is not None else s.epochs
        return Phase(
            name="fixed-mask",
            param_groups=lambda: [ParamGroup("values", [model.values], fixed_lr)]
            + head_groups(model.model, base.head_names, head_lr, s.weight_decay),
            epochs=epochs,
            max_steps=s.max_steps if epochs > 0 else None,
            warmup_ratio=s.warmup_ratio,
            on_start=lambda: self._project(model),
        )

    def _project(self, model: DiffModel) -> None:
        c = self.config
        with torch.no_grad():
            model.train(not self._deterministic_projection())  # train mode samples the gates
            deltas = [d for _, d in model.deltas()]
            model.train()
            flat = torch.cat([d.reshape(-1) for d in deltas])
            model.learned_density.fill_(flat.count_nonzero().item() / flat.numel())
            positions = top_positions(projection_scores(model, deltas), self.k, c.budget_scope)
            start = flat if c.fixed_init == "projected" else torch.cat([w.detach().reshape(-1) for w in model.w])
            model.fix(positions, start[positions])
            if dist.is_available() and dist.is_initialized():
                # each process drew its own gate sample: all keep the main process's choice
                for t in (model.positions, model.offsets, model.values, model.learned_density):
                    dist.broadcast(t, src=0)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().trainable_state(model)
        buffers = dict(model.named_buffers(recurse=False))
        if model.mode == "fixed":  # the lookahead's logit average (one float per gate) steers the L0 phase only
            buffers.pop("logit_average")
        state.update(buffers)
        return state

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(model, state)
        model.set_mode(model.mode)  # requires_grad flags follow the restored mode

    def trainable_params(self, model: nn.Module) -> int:
        head = sum(p.numel() for n, p in model.model.named_parameters() if p.requires_grad and n not in model.names)
        return self.k + head

    # -- the artifact ----------------------------------------------------------------------
    def to_patch(self, model: DiffModel, base: BaseModel, record: dict) -> TaskPatch:
        if model.mode != "fixed":
            raise DiffpruneError("the diff was never projected to its budget (the fixed-mask phase did not start)")
        diffs = {}
        for name, (positions, values) in model.sparse_deltas().items():
            dense = torch.zeros(model.model.get_parameter(name).numel(), device=positions.device)
            dense[positions] = values  # on the training device; TaskPatch keeps its copy on the CPU
            diffs[name] = dense.view_as(model.model.get_parameter(name))
        return TaskPatch.from_dense_diffs(diffs, head_state(model.model, base), patch_meta(base, self, record))

    @torch.no_grad()
    def finish(self, model: DiffModel) -> None:
        # The patch stores the values at --patch-dtype (fp16 by default): score those values.
        # (Values the type cannot hold are left for save to refuse with a clear message.)
        if model.mode != "fixed":
            return
        stored = model.values.to(VALUE_DTYPES[self.config.patch_dtype])
        if torch.isfinite(stored).all():
            model.values.copy_(stored)

    def save(self, model: nn.Module, base: BaseModel, output: Path, record: dict) -> dict[str, int]:
        files = save_patch(self.to_patch(model, base, record), output, self.config.patch_dtype)
        self.patch_bytes, self.patch_path = files[PATCH_FILE], output / PATCH_FILE
        return files

    def load_artifact(self, base: BaseModel, output: Path) -> nn.Module:
        return load_patched(base, output)

    def record_extras(self, model: nn.Module, base: BaseModel) -> dict[str, Any]:
        extras = {"budget": self.config.budget, "nnz": int(model.values.count_nonzero()) if model.mode == "fixed"
                  else None, "base_params": base.num_base_params, "k": self.k}
        if float(model.learned_density) >= 0:
            extras["learned_density"] = float(model.learned_density)
        contents = f"{extras['nnz'] or 0:,} changed entries, {self.config.patch_dtype} values"
        return {**extras, **patch_summary(self, contents, model.model)}


class _AdaptiveDiff(_DiffBase):
    Config = DiffOptions
    default_lr = 1e-4

    def _gates(self) -> dict[str, Any]:
        c = self.config
        return {"gate_shape": GateShape(c.gate_l, c.gate_r, c.gate_temperature), "alpha_init": c.alpha_init,
                "track_gate_velocity": c.controller_lookahead > 0}

    def _deterministic_projection(self) -> bool:
        return self.config.projection == "deterministic"

    def phases(self, model: DiffModel, base: BaseModel, s: TrainSettings) -> list[Phase]:
        c, lr = self.config, self.lr(s)
        head_lr = s.head_lr if s.head_lr is not None else lr
        target = c.target_density if c.target_density is not None else min(1.0, 2 * self.k / model.total)
        steering = DensitySteering(model, c, target)

        def groups() -> list[ParamGroup]:
            clip = s.max_grad_norm or None  # w and the gates are clipped separately, as in the paper
            return [
                ParamGroup("w", list(model.w), lr, 0.0, max_grad_norm=clip),
                ParamGroup("gates", model.gate_logits(), c.alpha_lr, 0.0, schedule="constant", max_grad_norm=clip),
            ] + head_groups(model.model, base.head_names, head_lr, s.weight_decay)

        # keep_best off: the projection needs the L0 phase's last state, not its best epoch's.
        l0 = Phase(name="l0", param_groups=groups, epochs=s.epochs, max_steps=s.max_steps,
                   warmup_ratio=s.warmup_ratio, extra_losses=lambda _inputs: steering.penalty(),
                   on_start=steering.start,
                   after_step=steering.after_step, keep_best=False, metrics=steering.metrics)
        return [l0, self._fixed_phase(model, base, s)]


@register
class DiffPruning(_AdaptiveDiff):
    name = "diff"
    summary = "diff pruning: a sparse diff learned with hard-concrete L0 gates, projected to a budget"


@register
class StructuredDiffPruning(_AdaptiveDiff):
    name = "diff-struct"
    summary = "structured diff pruning: also one gate per weight matrix and bias vector (the paper's best)"
    structured = True


@register
class NonAdaptiveDiff(_DiffBase):
    name = "nonadaptive"
    summary = "non-adaptive diff pruning: finetune fully, keep the top-k changes, finetune them"
    Config = NonAdaptiveOptions
    mode = "dense"
    default_lr = 5e-5

    def phases(self, model: DiffModel, base: BaseModel, s: TrainSettings) -> list[Phase]:
        lr = self.lr(s)
        head_lr = s.head_lr if s.head_lr is not None else lr

        def groups() -> list[ParamGroup]:
            decay, no_decay = decay_split(zip(model.names, model.w))
            return [ParamGroup("w", decay, lr, s.weight_decay), ParamGroup("w_no_decay", no_decay, lr, 0.0)] \
                + head_groups(model.model, base.head_names, head_lr, s.weight_decay)

        # Cut gradually, the phase's last state is the one at the budget: no best epoch is restored.
        gradual = self.config.prune == "gradual"
        dense = Phase(name="finetune", param_groups=groups, epochs=s.epochs, max_steps=s.max_steps,
                      warmup_ratio=s.warmup_ratio, keep_best=not gradual,
                      after_step=(lambda step, total: self._prune(model, step, total)) if gradual else None,
                      metrics=(lambda: {"density": self._density(model)}) if gradual else None)
        return [dense, self._fixed_phase(model, base, s)]

    def _prune(self, model: DiffModel, step: int, total: int) -> None:
        """--prune gradual: keep the diff's largest entries, as many as the cubic schedule allows
        at this step. The rest are zeroed; Adam may grow one back, and it stays if it wins a place."""
        c = self.config
        density = cubic_schedule(step, total, 1.0, self.k / model.total, c.prune_begin, c.prune_reach)
        keep_largest(list(model.w), max(self.k, round(density * model.total)))

    @staticmethod
    def _density(model: DiffModel) -> float:
        return sum(int(w.count_nonzero()) for w in model.w) / model.total
