"""Feature extraction: the frozen base with only the task head trained (the floor every
adapting method has to clear). Its patch holds the head and changes no base entry."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from diffprune.base import BaseModel
from diffprune.heads import FROZEN_ENCODER_HEAD_LR
from diffprune.methods.artifact import PATCH_FILE, head_state, load_patched, patch_meta, save_patch
from diffprune.methods.full import single_phase
from diffprune.methods.registry import Method, register
from diffprune.patch import TaskPatch
from diffprune.training.phases import Phase
from diffprune.training.settings import TrainSettings


@register
class HeadOnly(Method):
    name = "head"
    artifact = PATCH_FILE
    summary = "feature extraction: the base frozen, only the task head trains"
    default_lr = FROZEN_ENCODER_HEAD_LR

    def prepare(self, base: BaseModel) -> nn.Module:
        for name, p in base.model.named_parameters():
            p.requires_grad_(name in base.head_names)
        return base.model

    def phases(self, model: nn.Module, base: BaseModel, s: TrainSettings) -> list[Phase]:
        return [single_phase(model, base, s, self.lr(s))]

    def save(self, model: nn.Module, base: BaseModel, output: Path, record: dict) -> dict[str, int]:
        patch = TaskPatch({}, head_state(model, base), patch_meta(base, self, record))
        return save_patch(patch, output, "float32")

    def load_artifact(self, base: BaseModel, output: Path) -> nn.Module:
        return load_patched(base, output)
