"""LoRA (Hu et al. 2022) through HF PEFT: low-rank adapters on chosen linear layers + the head."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError
from diffprune.methods.peft_adapter import PeftAdapterMethod, head_modules
from diffprune.methods.registry import register
from diffprune.training.settings import option


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


@register
class Lora(PeftAdapterMethod):
    name = "lora"
    summary = "LoRA adapters through HF PEFT (rank, alpha and target modules configurable)"
    Config = LoraOptions
    default_lr = 5e-4

    def peft_config(self, base: BaseModel):
        from peft import LoraConfig, TaskType

        c = self.config
        return LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=c.lora_r,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=c.lora_targets,
            modules_to_save=head_modules(base),
        )
