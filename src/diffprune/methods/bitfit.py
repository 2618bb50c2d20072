"""BitFit (Ben Zaken et al. 2022): only the bias terms of the base train, plus the task head."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from diffprune.base import BaseModel
from diffprune.methods.artifact import PATCH_FILE, head_state, load_patched, patch_meta, save_patch
from diffprune.methods.full import single_phase
from diffprune.methods.registry import Method, register
from diffprune.patch import TaskPatch
from diffprune.training.phases import Phase
from diffprune.training.settings import TrainSettings


def is_bias(name: str) -> bool:
    # HF names every bias parameter "bias" in every architecture; no model-specific rule.
    return name.rsplit(".", 1)[-1] == "bias"


@register
class BitFit(Method):
    name = "bitfit"
    artifact = PATCH_FILE
    summary = "BitFit: biases of the base and the task head train, nothing else"
    default_lr = 1e-3

    def prepare(self, base: BaseModel) -> nn.Module:
        for name, p in base.model.named_parameters():
            p.requires_grad_(name in base.head_names or is_bias(name))
        # The biases are small: keep their pretrained values to store the change as a patch.
        self.pretrained = {n: p.detach().clone() for n, p in base.base_parameters().items() if is_bias(n)}
        return base.model

    def phases(self, model: nn.Module, base: BaseModel, s: TrainSettings) -> list[Phase]:
        return [single_phase(model, base, s, self.lr(s))]

    def save(self, model: nn.Module, base: BaseModel, output: Path, record: dict) -> dict[str, int]:
        trained = {n: p.detach() for n, p in model.named_parameters() if n in self.pretrained}
        patch = TaskPatch.from_models(self.pretrained, trained, head_state(model, base), patch_meta(base, self, record))
        return save_patch(patch, output, "float32")

    def load_artifact(self, base: BaseModel, output: Path) -> nn.Module:
        return load_patched(base, output)
