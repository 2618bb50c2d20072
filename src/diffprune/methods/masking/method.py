"""Methods whose task result is a set of base entries switched off (a `mask` patch).

Each trains the task head under a mask that evolves in a first phase ("prune") and is then made
exact, the top 1 - s entries by the method's score in the chosen scope, for a last phase that
trains the head with the mask fixed ("head"). The base weights never change. Subclasses say
how the mask evolves: learned scores (adapting by pruning, abp.py), the pretrained weights'
magnitude on a gradual schedule, or a random draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffprune.base import BaseModel
from diffprune.heads import FROZEN_ENCODER_HEAD_LR
from diffprune.methods.artifact import PATCH_FILE, head_state, load_patched, patch_meta, patch_summary, save_patch
from diffprune.methods.masking.options import MagnitudeOptions, MaskOptions
from diffprune.methods.registry import Method, register
from diffprune.patch import TaskPatch
from diffprune.pruning.masked import MaskedModel
from diffprune.pruning.schedule import PruningSchedule
from diffprune.pruning.targets import prune_targets
from diffprune.pruning.topk import keep_masks, kept_count
from diffprune.training.phases import ParamGroup, Phase, head_groups
from diffprune.training.settings import TrainSettings



class MaskMethod(Method):
    Config = MaskOptions
    artifact = PATCH_FILE
    default_lr = FROZEN_ENCODER_HEAD_LR  # the mask is not learned: the head is what trains (heads.py)
    fsdp_refused = ("its masks sit beside the frozen base and are read whole; launch it with DDP "
                    "(accelerate launch without an FSDP config, or torchrun)")
    learned = False

    def prepare(self, base: BaseModel) -> nn.Module:
        for name, p in base.model.named_parameters():
            p.requires_grad_(name in base.head_names)
        names = prune_targets(base.model, base.base_names, self.config.prune_include)
        self.kept_total = kept_count(self.config.sparsity, sum(base.model.get_parameter(n).numel() for n in names))
        return MaskedModel(base.model, names, learned=self.learned, **self._mask_settings())

    def _mask_settings(self) -> dict[str, Any]:
        return {}

    # -- the mask ----------------------------------------------------------------------------
    def scores(self, model: MaskedModel) -> list[torch.Tensor]:
        """What ranks the entries for the exact mask: larger is kept."""
        raise NotImplementedError

    def exact_masks(self, model: MaskedModel) -> list[torch.Tensor]:
        return keep_masks(self.scores(model), self.kept_total, self.config.prune_scope)

    def make_exact(self, model: MaskedModel) -> None:
        model.fix(self.exact_masks(model))

    # -- phases ----------------------------------------------------------------------------
    def head_groups(self, model: MaskedModel, base: BaseModel, s: TrainSettings) -> list[ParamGroup]:
        return head_groups(model.model, base.head_names, self.head_lr(s), s.weight_decay)

    def head_lr(self, s: TrainSettings) -> float:
        """--head-lr, else --lr: the head is what a method with a fixed mask trains."""
        return s.head_lr if s.head_lr is not None else self.lr(s)

    def prune_phase(self, model: MaskedModel, base: BaseModel, s: TrainSettings) -> Phase:
        raise NotImplementedError

    def phases(self, model: MaskedModel, base: BaseModel, s: TrainSettings) -> list[Phase]:
        epochs = self.config.head_epochs
        last = Phase(name="head", param_groups=lambda: self.head_groups(model, base, s),
                     epochs=epochs, max_steps=s.max_steps if epochs > 0 else None, warmup_ratio=s.warmup_ratio,
                     on_start=lambda: self.make_exact(model))
        return [self.prune_phase(model, base, s), last]

    def finish(self, model: MaskedModel) -> None:
        if model.learning:  # --head-epochs 0 after a resume that skipped the last phase's start
            self.make_exact(model)

    # -- state -----------------------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {n: p for n, p in model.named_parameters() if p.requires_grad or n.startswith("scores.")}
        state.update(model.named_buffers(recurse=False))
        return state

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(model, state)
        if not model.learning:
            model.fix(model.keep)  # the scores stop training, as they did before the checkpoint

    def trainable_params(self, model: nn.Module) -> int:
        head = sum(p.numel() for n, p in model.model.named_parameters() if p.requires_grad)
        return head + sum(s.numel() for s in model.scores)

    # -- the artifact ----------------------------------------------------------------------
    def to_patch(self, model: MaskedModel, base: BaseModel, record: dict) -> TaskPatch:
        switched_off = {name: ~keep for name, keep in zip(model.names, model.kept())}
        return TaskPatch.from_masks(switched_off, head_state(model.model, base), patch_meta(base, self, record))

    def save(self, model: nn.Module, base: BaseModel, output: Path, record: dict) -> dict[str, int]:
        files = save_patch(self.to_patch(model, base, record), output, "float32")
        self.patch_bytes, self.patch_path = files[PATCH_FILE], output / PATCH_FILE
        return files

    def load_artifact(self, base: BaseModel, output: Path) -> nn.Module:
        return load_patched(base, output)

    def record_extras(self, model: nn.Module, base: BaseModel) -> dict[str, Any]:
        kept = model.kept()
        extras = {"sparsity": model.sparsity(), "target_sparsity": self.config.sparsity, "pruned_tensors": len(kept),
                  "tensor_sparsity": {n: 1 - float(k.float().mean()) for n, k in zip(model.names, kept)},
                  "nnz": model.total - sum(int(k.sum()) for k in kept), "base_params": base.num_base_params}
        contents = (f"{extras['nnz']:,} base entries switched off, {100 * extras['sparsity']:.1f}% of the "
                    f"{model.total:,} pruned")
        return {**extras, **patch_summary(self, contents, model.model)}


@register
class GradualMagnitude(MaskMethod):
    name = "magnitude"
    summary = "gradual magnitude pruning of the frozen pretrained weights (cubic schedule); the head trains"
    Config = MagnitudeOptions

    def scores(self, model: MaskedModel) -> list[torch.Tensor]:
        return [theta0.detach().abs() for theta0 in model._theta0]

    def prune_phase(self, model: MaskedModel, base: BaseModel, s: TrainSettings) -> Phase:
        c = self.config
        schedule = PruningSchedule(c.prune_schedule, c.sparsity, events=c.pruning_events, begin=c.prune_begin,
                                   reach=c.prune_reach)

        def prune(step: int, total: int) -> None:
            """Recompute the mask at each pruning event (the weights never change, so it only grows)."""
            if schedule.event(step, total) != schedule.event(step - 1, total):
                kept = kept_count(schedule.sparsity(step, total), model.total)
                model.fix(keep_masks(self.scores(model), kept, c.prune_scope))

        one_shot = c.prune_schedule == "one-shot"
        return Phase(name="prune", param_groups=lambda: self.head_groups(model, base, s),
                     epochs=s.epochs, max_steps=s.max_steps, warmup_ratio=s.warmup_ratio,
                     on_start=(lambda: self.make_exact(model)) if one_shot else None,
                     after_step=None if one_shot else prune, keep_best=False,
                     metrics=lambda: {"sparsity": model.sparsity()})


@register
class RandomMask(MaskMethod):
    name = "random-mask"
    summary = "a random mask at the same sparsity on the frozen pretrained weights; the head trains"

    def prepare(self, base: BaseModel) -> nn.Module:
        model = super().prepare(base)
        self.seed = torch.initial_seed()  # set from --seed before the model loaded: the same on every process
        return model

    def scores(self, model: MaskedModel) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        return [torch.rand(t.shape, generator=g) for t in model._theta0]

    def prune_phase(self, model: MaskedModel, base: BaseModel, s: TrainSettings) -> Phase:
        return Phase(name="prune", param_groups=lambda: self.head_groups(model, base, s),
                     epochs=s.epochs, max_steps=s.max_steps, warmup_ratio=s.warmup_ratio, keep_best=False,
                     on_start=lambda: self.make_exact(model))
