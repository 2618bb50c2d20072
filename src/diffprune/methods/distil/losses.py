"""The distillation loss terms (TinyBERT's, as SparseBERT uses them): attention, hidden states,
prediction. Each is a mean over the real (unpadded) positions of each example, then over the
examples, summed over the mapped layers; their sum is the loss."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from diffprune.training.phases import LossInputs


def attention_term(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor,
                   mapping: list[int]) -> torch.Tensor:
    """Sum over the student's layers of the MSE between its attention maps (batch, heads, query,
    key) and those of the teacher layer it maps to, over pairs of real tokens only: padded
    queries and keys are zeroed on both sides and left out of the mean."""
    pairs = (mask[:, None, :, None] * mask[:, None, None, :]).to(student[0].dtype)  # (batch, 1, L, L)
    total = student[0].new_zeros(())
    for layer, target in enumerate(mapping[1:]):
        total = total + per_example_mean((student[layer] - teacher[target - 1]).square() * pairs, pairs)
    return total


def hidden_term(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor,
                mapping: list[int]) -> torch.Tensor:
    """Sum over the student's hidden states, the embedding output included, of the MSE with the
    teacher's hidden state it maps to, over real tokens only."""
    tokens = mask[:, :, None].to(student[0].dtype)
    total = student[0].new_zeros(())
    for state, target in enumerate(mapping):
        total = total + per_example_mean((student[state] - teacher[target]).square() * tokens, tokens)
    return total


def per_example_mean(squares: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each example's mean over its real entries, then the mean over the examples: every example
    weighs the same whatever its length, so a batch split over processes (each term weighted by
    its share of the examples, as the task loss is) gives the whole batch's value exactly."""
    dims = tuple(range(1, squares.dim()))
    counts = weights.expand_as(squares).sum(dims).clamp_min(1.0)
    return (squares.sum(dims) / counts).mean()


def prediction_term(student: torch.Tensor, target: torch.Tensor, temperature: float, regression: bool) -> torch.Tensor:
    """Soft cross-entropy between the logits' distributions at `temperature`; for regression the
    MSE to `target` (the labels, or the teacher's outputs)."""
    if regression:
        return F.mse_loss(student.view(-1), target.view(-1).to(student.dtype))
    soft = F.softmax(target / temperature, dim=-1)
    return -(soft * F.log_softmax(student / temperature, dim=-1)).sum(-1).mean()


def kd_terms(inputs: LossInputs, terms: list[str], mapping: list[int], temperature: float,
             regression: bool, regression_target: str = "labels") -> dict[str, torch.Tensor]:
    """The chosen terms, named `kd_attention`, `kd_hidden`, `kd_prediction`. A regression task's
    prediction term learns `regression_target`: the labels (the paper's code), or the teacher."""
    s, t = inputs.outputs, inputs.teacher
    mask = inputs.batch.get("attention_mask")
    if mask is None:  # no padding
        mask = torch.ones_like(inputs.batch["input_ids"])
    found: dict[str, torch.Tensor] = {}
    if "attention" in terms:
        found["kd_attention"] = attention_term(s.attentions, t.attentions, mask, mapping)
    if "hidden" in terms:
        found["kd_hidden"] = hidden_term(s.hidden_states, t.hidden_states, mask, mapping)
    if "prediction" in terms:
        target = inputs.batch["labels"] if regression and regression_target == "labels" else t.logits
        found["kd_prediction"] = prediction_term(s.logits.float(), target.float(), temperature, regression)
    return found
