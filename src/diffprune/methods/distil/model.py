"""The module that trains: a student (pruned, distilled) beside its teacher, one nn.Module so
that checkpoints, DDP and `.to()` see both.

`forward(**batch)` runs the teacher while the teacher is being finetuned in the run (phase
"teacher"), the student afterwards; the buffer `distilling` says which, so a resumed run knows.
The pruning masks are buffers too. The teacher, once trained or loaded, stays in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn


class DistilModel(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module | None, pruned: list[str], *, teacher_trains: bool,
                 hidden: bool, attentions: bool) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.pruned = pruned  # names in the student of the pruned matrices
        # what the student's training forward and the teacher's return for the KD terms
        self.hidden, self.attentions = hidden, attentions
        self.register_buffer("distilling", torch.tensor(not teacher_trains))
        for i, name in enumerate(pruned):
            self.register_buffer(f"keep_{i}", torch.ones_like(student.get_parameter(name), dtype=torch.bool))

    # -- what runs ------------------------------------------------------------------------
    def forward(self, **batch):
        if not bool(self.distilling):
            return self.teacher(**batch)
        if not self.training:  # evaluation needs the logits only
            return self.student(**batch)
        return self.student(**batch, output_hidden_states=self.hidden, output_attentions=self.attentions)

    @torch.no_grad()
    def teacher_outputs(self, batch: dict[str, torch.Tensor]):
        return self.teacher(**batch, output_hidden_states=self.hidden, output_attentions=self.attentions)

    def train(self, mode: bool = True) -> DistilModel:
        super().train(mode)
        if self.teacher is not None and bool(self.distilling):
            self.teacher.eval()  # a teacher without dropout, as trained teachers are used
        return self

    def start_distilling(self, copy_teacher: bool) -> None:
        """The teacher phase (if any) is over; the student starts from the teacher if asked. (The
        teacher's parameters stay as they are: no optimiser holds them from here on, and its
        forward runs without gradients.)"""
        self.distilling.fill_(True)
        if self.teacher is None:  # pruning without distillation, from the pretrained base
            return
        self.teacher.eval()
        if copy_teacher:
            self.student.load_state_dict(self.teacher.state_dict())

    # -- the masks ------------------------------------------------------------------------
    def weights(self) -> list[nn.Parameter]:
        return [self.student.get_parameter(n) for n in self.pruned]

    def masks(self) -> list[torch.Tensor]:
        return [getattr(self, f"keep_{i}") for i in range(len(self.pruned))]

    @torch.no_grad()
    def set_masks(self, keep: list[torch.Tensor]) -> None:
        for mask, new in zip(self.masks(), keep):
            mask.copy_(new)

    @torch.no_grad()
    def apply_masks(self) -> None:
        for w, keep in zip(self.weights(), self.masks()):
            w.masked_fill_(~keep, 0.0)

    def kept(self) -> int:
        return sum(int(k.sum()) for k in self.masks())

    def total(self) -> int:
        return sum(k.numel() for k in self.masks())

    def sparsity(self) -> float:
        return 1 - self.kept() / max(self.total(), 1)
