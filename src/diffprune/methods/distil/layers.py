"""The student's shape and what distillation reads from a model: fewer layers mapped uniformly
onto the teacher's (TinyBERT), and attention scores before the softmax.

transformers returns attention *probabilities* with `output_attentions=True`. The paper matches
the scores before the softmax. Models built on transformers' attention interface call one
attention function per layer; registering one that returns the raw scores (query . key * scale)
in place of the probabilities exposes them without touching the model. Whether that function
computes what the model's own does is checked on a probe input when a model is set up; where it
does not (or the model does not use the interface), the probabilities are used instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from diffprune.errors import DiffpruneError
from diffprune.pruning.targets import layer_stack

SCORES, PROBABILITIES = "scores", "probabilities"
_IMPLEMENTATION = "diffprune_scores"


def score_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention that returns the scores before the softmax as its "weights"."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    masked = scores + attention_mask if attention_mask is not None else scores
    probs = F.dropout(F.softmax(masked, dim=-1), p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), scores


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(_IMPLEMENTATION, score_attention)
    AttentionMaskInterface.register(_IMPLEMENTATION, eager_mask)  # the additive mask eager attention takes


@torch.no_grad()
def expose_attention(model: nn.Module) -> str:
    """Make `model` return attention scores before the softmax with `output_attentions=True`
    if a probe shows that its outputs stay what they were; else the probabilities (eager
    attention, which output_attentions needs). Returns which of the two it returns."""
    was_training = model.training
    model.eval()
    probe = _probe_batch(model)
    try:
        model.set_attn_implementation("eager")
        expected = model(**probe, output_hidden_states=True)
        try:
            _register()
            model.set_attn_implementation(_IMPLEMENTATION)
            got = model(**probe, output_hidden_states=True, output_attentions=True)
            same = torch.allclose(got.logits, expected.logits, atol=1e-5, rtol=1e-4) and all(
                torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(got.hidden_states, expected.hidden_states))
            if same and got.attentions and len(got.attentions) == len(expected.hidden_states) - 1:
                return SCORES
        except (ValueError, TypeError, RuntimeError, AttributeError):
            pass
        model.set_attn_implementation("eager")
        return PROBABILITIES
    finally:
        model.train(was_training)


def _probe_batch(model: nn.Module) -> dict[str, torch.Tensor]:
    """Two rows of 12 tokens, the second with 4 padded positions (the mask must reach the scores)."""
    g = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    device = next(model.parameters()).device
    ids = torch.randint(min(5, vocab - 1), vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def count_layers(model: nn.Module) -> int:
    return len(layer_stack(model)[1])


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """For each of the student's hidden states (0: the embedding output, i: layer i's), the
    teacher's hidden state it learns from: i * L_teacher / L_student (TinyBERT's uniform map).
    Layer i's attention learns from the attention of the teacher layer whose output it matches."""
    if not 1 <= student_layers <= teacher_layers or teacher_layers % student_layers:
        divisors = [d for d in range(1, teacher_layers + 1) if teacher_layers % d == 0]
        raise DiffpruneError(f"a student of {student_layers} layers cannot map uniformly onto the teacher's "
                             f"{teacher_layers}: choose --student-layers among {', '.join(map(str, divisors))}")
    step = teacher_layers // student_layers
    return [i * step for i in range(student_layers + 1)]


def keep_first_layers(model: nn.Module, n: int) -> None:
    """Cut the encoder's layer stack to its first n layers, in place (the config follows). The
    first ones, not every k-th: each keeps the input it was pretrained on, the layer below it."""
    name, stack = layer_stack(model)
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, nn.ModuleList(list(stack)[:n]))
    model.config.num_hidden_layers = n
