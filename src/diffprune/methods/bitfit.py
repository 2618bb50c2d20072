"""BitFit (Ben Zaken et al. 2022): only the bias terms of the base train, plus the task head."""

from __future__ import annotations

from torch import nn

from diffprune.base import BaseModel
from diffprune.methods.full import single_phase
from diffprune.methods.registry import Method, register
from diffprune.training.phases import Phase
from diffprune.training.settings import TrainSettings


@register
class BitFit(Method):
    name = "bitfit"
    summary = "BitFit: biases of the base and the task head train, nothing else"

    def prepare(self, base: BaseModel) -> nn.Module:
        for name, p in base.model.named_parameters():
            # HF names every bias parameter "bias" in every architecture; no model-specific rule.
            p.requires_grad_(name in base.head_names or name.rsplit(".", 1)[-1] == "bias")
        return base.model

    def phases(self, model: nn.Module, base: BaseModel, s: TrainSettings) -> list[Phase]:
        return [single_phase(model, base, s)]
