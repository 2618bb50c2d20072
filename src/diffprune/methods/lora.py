"""LoRA (Hu et al. 2022) through HF PEFT: low-rank adapters on chosen linear layers + the head."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError
from diffprune.methods.artifact import load_adapter, save_adapter
from diffprune.methods.full import single_phase
from diffprune.methods.registry import Method, register
from diffprune.training.phases import Phase
from diffprune.training.settings import TrainSettings, option


@dataclass
class LoraOptions:
    lora_r: int = option(8, "LoRA rank.")
    lora_alpha: float = option(16.0, "LoRA scaling numerator (the update is scaled by alpha / r).")
    lora_dropout: float = option(0.1, "Dropout on the LoRA input.")
    lora_targets: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt, comma separated; default: PEFT's choice for the "
                          "architecture (query,value for BERT)."},
    )

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise DiffpruneError("--lora-r must be at least 1")
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]


def head_modules(base: BaseModel) -> list[str]:
    """Top-level module names holding the head, for PEFT's `modules_to_save`."""
    return sorted({name.split(".")[0] for name in base.head_names})


@register
class Lora(Method):
    name = "lora"
    summary = "LoRA adapters through HF PEFT (rank, alpha and target modules configurable)"
    Config = LoraOptions
    default_lr = 5e-4

    def prepare(self, base: BaseModel) -> nn.Module:
        from peft import LoraConfig, TaskType, get_peft_model

        c = self.config
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=c.lora_r,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=c.lora_targets,
            modules_to_save=head_modules(base),
        )
        try:
            return get_peft_model(base.model, config)
        except ValueError as e:
            raise DiffpruneError(f"LoRA cannot wrap this model: {str(e).splitlines()[0]}") from e

    def phases(self, model: nn.Module, base: BaseModel, s: TrainSettings) -> list[Phase]:
        return [single_phase(model, base, s, self.lr(s))]

    def save(self, model: nn.Module, base: BaseModel, output: Path, record: dict) -> dict[str, int]:
        return save_adapter(model, output)

    def load_artifact(self, base: BaseModel, output: Path) -> nn.Module:
        return load_adapter(base, output)
