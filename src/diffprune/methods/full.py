"""Full finetuning: every parameter trains. The baseline every other method is measured against."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from diffprune.base import BaseModel, load_base
from diffprune.io import atomic_dir
from diffprune.methods.registry import Method, register
from diffprune.training.phases import Phase, standard_groups
from diffprune.training.settings import TrainSettings


@register
class FullFinetune(Method):
    name = "full"
    artifact = "model"
    summary = "full finetuning: all parameters train (a full model copy per task)"

    def prepare(self, base: BaseModel) -> nn.Module:
        base.model.requires_grad_(True)
        return base.model

    def phases(self, model: nn.Module, base: BaseModel, s: TrainSettings) -> list[Phase]:
        return [single_phase(model, base, s, self.lr(s))]

    def save(self, model: nn.Module, base: BaseModel, output: Path, record: dict) -> dict[str, int]:
        with atomic_dir(output / self.artifact) as tmp:
            model.save_pretrained(tmp)
            base.tokenizer.save_pretrained(tmp)
        return self.artifact_files(output)

    def load_artifact(self, base: BaseModel, output: Path) -> nn.Module:
        return load_base(output / self.artifact, base.model.config.num_labels, labels=base.labels,
                         regression=base.model.config.problem_type == "regression").model


def single_phase(model: nn.Module, base: BaseModel, s: TrainSettings, lr: float,
                 head_names: frozenset[str] | None = None) -> Phase:
    """The one-phase schedule shared by the dense baselines (`head_names`: the head's parameter
    names in `model`, when a wrapper renamed them)."""
    head_lr = s.head_lr if s.head_lr is not None else lr
    head = head_names if head_names is not None else base.head_names
    return Phase(
        name="finetune",
        param_groups=lambda: standard_groups(model.named_parameters(), head, lr, head_lr, s.weight_decay),
        epochs=s.epochs,
        max_steps=s.max_steps,
        warmup_ratio=s.warmup_ratio,
    )
