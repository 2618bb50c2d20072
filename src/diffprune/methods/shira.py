"""SHiRA (Bhardwaj et al. 2024) through HF PEFT: finetune a fixed random sparse subset of the
base's linear weights. The baseline a learned mask has to beat at the same number of entries.

PEFT trains it; the result is stored as an `add` patch like every diff, which is exact: PEFT's
SHiRA forward is F.linear(x, W + sparse(values at its indices)) with a scaling of 1, the very
sum that applying the patch writes into W."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError
from diffprune.pruning.topk import budget_count, budget_option, check_budget
from diffprune.methods.artifact import PATCH_FILE, load_patched, patch_meta, save_patch
from diffprune.methods.peft_adapter import PeftAdapterMethod, head_modules
from diffprune.patch import SparseDiff, TaskPatch
from diffprune.methods.registry import register
from diffprune.training.settings import option


@dataclass
class ShiraOptions:
    shira_r: int | None = option(
        None, "SHiRA 'rank': r * (m + n) entries per m x n linear layer. Default: set from --budget."
    )
    budget: float = budget_option()

    def __post_init__(self) -> None:
        check_budget(self.budget)


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
    artifact = PATCH_FILE

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

    def to_patch(self, model: nn.Module, base: BaseModel, record: dict) -> TaskPatch:
        """The adapter as an `add` patch on the base: each layer's values at its flat indices."""
        wrapped = model.base_model.model  # PEFT's copy of the HF model, with the same module names
        names = {m: name for name, m in wrapped.named_modules()}
        diffs = {}
        for module in wrapped.modules():
            if "default" not in getattr(module, "shira_indices", {}):
                continue
            weight = module.get_base_layer().weight
            rows, cols = module.shira_indices["default"].long()
            values = module.shira_weight["default"].detach() * module.scaling["default"]
            diffs[f"{names[module]}.weight"] = SparseDiff(tuple(weight.shape), rows * weight.shape[1] + cols, values)
        head = {}
        for name in base.head_names:  # PEFT trains a copy of each head module: `<module>.modules_to_save.default`
            module, param = name.rsplit(".", 1)
            head[name] = wrapped.get_parameter(f"{module}.modules_to_save.default.{param}").detach().clone()
        return TaskPatch(diffs, head, patch_meta(base, self, record))

    def save(self, model: nn.Module, base: BaseModel, output: Path, record: dict) -> dict[str, int]:
        return save_patch(self.to_patch(model, base, record), output, "float32")

    def load_artifact(self, base: BaseModel, output: Path) -> nn.Module:
        return load_patched(base, output)
