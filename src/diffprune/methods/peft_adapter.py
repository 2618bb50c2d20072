"""Methods that are HF PEFT adapters (LoRA, SHiRA): PEFT wraps the model and saves the adapter;
diffprune only chooses the config. Reimplementing these methods here would help nobody."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError, first_line
from diffprune.io import atomic_dir
from diffprune.methods.full import single_phase
from diffprune.methods.registry import Method
from diffprune.training.phases import Phase
from diffprune.training.settings import TrainSettings


def head_modules(base: BaseModel) -> list[str]:
    """Names of the modules holding the head, for PEFT's `modules_to_save` (the modules
    themselves, not their top-level parents: a head inside the encoder must not make the whole
    encoder trainable)."""
    return sorted({name.rsplit(".", 1)[0] for name in base.head_names})


class PeftAdapterMethod(Method):
    artifact = "adapter"

    def peft_config(self, base: BaseModel):
        raise NotImplementedError

    def prepare(self, base: BaseModel) -> nn.Module:
        from peft import get_peft_model

        try:
            return get_peft_model(base.model, self.peft_config(base))
        except ValueError as e:
            raise DiffpruneError(f"{self.name} cannot wrap this model: {first_line(e)}") from e

    def phases(self, model: nn.Module, base: BaseModel, s: TrainSettings) -> list[Phase]:
        # PEFT renames the head it trains: `...classifier.modules_to_save.default.weight`
        head = frozenset(n for n, _ in model.named_parameters() if ".modules_to_save." in n)
        return [single_phase(model, base, s, self.lr(s), head_names=head)]

    def save(self, model: nn.Module, base: BaseModel, output: Path, record: dict) -> dict[str, int]:
        with atomic_dir(output / self.artifact) as tmp:
            model.save_pretrained(tmp)
        return self.artifact_files(output)

    def load_artifact(self, base: BaseModel, output: Path) -> nn.Module:
        from peft import PeftModel

        folder = output / self.artifact
        try:
            return PeftModel.from_pretrained(base.model, folder)
        except (OSError, ValueError) as e:  # PEFT's "Can't find 'adapter_config.json'" and the like
            raise DiffpruneError(f"cannot load the {self.name} adapter in {folder}: {first_line(e)}") from e
