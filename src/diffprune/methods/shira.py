"""SHiRA (Bhardwaj et al. 2024) through HF PEFT: finetune a fixed random sparse subset of the
base's linear weights. The baseline a learned mask has to beat at the same number of entries."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError
from diffprune.methods.diff.budget import budget_count
from diffprune.methods.peft_adapter import PeftAdapterMethod, head_modules
from diffprune.methods.registry import register
from diffprune.training.settings import option


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
class Shira(PeftAdapterMethod):
    name = "shira"
    summary = "SHiRA through HF PEFT: a fixed random sparse subset of the linear weights trains"
    Config = ShiraOptions
    default_lr = 5e-4

    def peft_config(self, base: BaseModel):
        from peft import ShiraConfig

        layers = linear_layers(base)
        if not layers:
            raise DiffpruneError("SHiRA needs nn.Linear layers in the base model, and this one has none")
        per_rank = sum(m.in_features + m.out_features for m in layers.values())
        self.r = self.config.shira_r or max(1, round(budget_count(self.config.budget, base.num_base_params) / per_rank))
        self.entries = self.r * per_rank
        return ShiraConfig(r=self.r, mask_type="random", random_seed=0, target_modules=sorted(layers),
                           modules_to_save=head_modules(base))

    def record_extras(self, model: nn.Module, base: BaseModel) -> dict:
        return {"budget": self.config.budget, "shira_r": self.r, "nnz": self.entries}
