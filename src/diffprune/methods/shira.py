"""SHiRA (Bhardwaj et al. 2024) through HF PEFT: finetune a fixed random sparse subset of the
base's linear weights. The baseline a learned mask has to beat at the same number of entries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError
from diffprune.methods.diff.budget import budget_count
from diffprune.methods.artifact import load_adapter, save_adapter
from diffprune.methods.full import single_phase
from diffprune.methods.lora import head_modules
from diffprune.methods.registry import Method, register
from diffprune.training.phases import Phase
from diffprune.training.settings import TrainSettings, option


@dataclass
class ShiraOptions:
    shira_r: int | None = option(
        None, "SHiRA 'rank': r * (m + n) entries per m x n linear layer. Default: set from --budget."
    )
    budget: float = option(0.005, "Entries the patch keeps: a fraction of the base parameters, or a count if >= 1.")


def linear_layers(base: BaseModel) -> dict[str, nn.Linear]:
    """Every nn.Linear of the base (not the head), by module name: SHiRA supports linear layers only."""
    heads = {n.rsplit(".", 1)[0] for n in base.head_names}
    return {name: m for name, m in base.model.named_modules() if isinstance(m, nn.Linear) and name not in heads}


@register
class Shira(Method):
    name = "shira"
    summary = "SHiRA through HF PEFT: a fixed random sparse subset of the linear weights trains"
    Config = ShiraOptions
    default_lr = 5e-4

    def prepare(self, base: BaseModel) -> nn.Module:
        from peft import ShiraConfig, get_peft_model

        layers = linear_layers(base)
        if not layers:
            raise DiffpruneError("SHiRA needs nn.Linear layers in the base model, and this one has none")
        per_rank = sum(m.in_features + m.out_features for m in layers.values())
        r = self.config.shira_r or max(1, round(budget_count(self.config.budget, base.num_base_params) / per_rank))
        self.r = r
        config = ShiraConfig(r=r, mask_type="random", random_seed=0, target_modules=sorted(layers),
                             modules_to_save=head_modules(base))
        model = get_peft_model(base.model, config)
        self.entries = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "shira" in n)
        return model

    def phases(self, model: nn.Module, base: BaseModel, s: TrainSettings) -> list[Phase]:
        return [single_phase(model, base, s, self.lr(s))]

    def save(self, model: nn.Module, base: BaseModel, output: Path, record: dict) -> dict[str, int]:
        return save_adapter(model, output)

    def load_artifact(self, base: BaseModel, output: Path) -> nn.Module:
        return load_adapter(base, output)

    def record_extras(self, model: nn.Module, base: BaseModel) -> dict:
        return {"budget": self.config.budget, "shira_r": self.r, "nnz": self.entries}
