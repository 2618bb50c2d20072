"""Task heads over the shared encoder: the architecture's own, or a learned mix of every layer.

`--head model` keeps the sequence classifier transformers builds (BERT: a linear layer on the
pretrained pooler's tanh of the last [CLS]). The adapting-by-pruning paper (Gao et al. 2021)
puts a different head on the frozen encoder: a learned weighted average of the [CLS] vector of
every layer, embedding output included, into an MLP of the model's width with ReLU. That
matters most where the encoder stays frozen: a sentence encoder such as all-MiniLM-L6-v2 was
trained to be read by a mean over tokens, not through its pooler, so a linear head on the pooled
[CLS] finds little there. `mean-mix` is the same head over each layer's mean over its tokens.

The mixed head keeps the encoder under the attribute transformers gives it (`bert`, `roberta`,
...), so the base parameters have the same names, and the same fingerprint, under every head:
one base serves tasks of every head kind. Its own tensors are the head a patch stores.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from diffprune.errors import DiffpruneError

MODEL_HEAD = "model"
# The rate of a head trained on a frozen encoder (feature extraction, the mask methods), from
# scratch. benchmarks/head_probe.py on MiniLM's frozen STS-B features (all 5,749 pairs, 4
# epochs): 1e-3 / 3e-3 / 1e-2 gave Pearson 72.4 / 75.2 / 76.3 with mean-mix and -8.5 / -0.2 /
# 13.9 with the model's head; on MRPC every rate stayed within a point of the majority class.
FROZEN_ENCODER_HEAD_LR = 3e-3
# name -> how every layer's hidden states (batch, tokens, width) become one vector per example
POOLINGS = {"cls-mix": "cls", "mean-mix": "mean"}
HEADS = (MODEL_HEAD, *POOLINGS)


def check_head(name: str) -> str:
    if name not in HEADS:
        raise DiffpruneError(f"unknown head '{name}': choose one of {', '.join(HEADS)}")
    return name


class LayerMix(nn.Module):
    """A softmax-weighted average over the first dimension (the layers); uniform at the start."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(layers))

    def forward(self, per_layer: torch.Tensor) -> torch.Tensor:
        return torch.einsum("l,lbh->bh", torch.softmax(self.weight, 0).to(per_layer.dtype), per_layer)


class LayerMixHead(nn.Module):
    """Every layer's hidden states -> one vector per layer ([CLS], or the mean over real tokens)
    -> their learned mix -> dropout, Linear(width, width), ReLU, dropout, Linear(width, labels).
    Every tensor is a submodule's parameter: PEFT's `modules_to_save` and serving address the
    head by module."""

    def __init__(self, config, pooling: str) -> None:
        super().__init__()
        self.pooling = pooling
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
        if not isinstance(layers, int) or layers < 1:
            raise DiffpruneError(f"the {config.model_type} config states no layer count: the mixed head needs one")
        self.layer_mix = LayerMix(layers + 1)  # the embedding output and every layer
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        dropout = getattr(config, "hidden_dropout_prob", None) or getattr(config, "dropout", None)
        self.dropout = nn.Dropout(dropout if isinstance(dropout, float) else 0.1)
        for layer in (self.dense, self.out_proj):
            nn.init.normal_(layer.weight, std=getattr(config, "initializer_range", 0.02))
            nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def start_from_labels(self, labels: list[float | int], regression: bool) -> None:
        """The output starts at the labels: their mean for regression, their log frequencies for
        classes. The encoder is often frozen and the layers start near zero, so an output that
        had to climb from 0 to STS-B's mean of 2.7 spent much of a short run on that."""
        y = torch.tensor(labels, dtype=torch.float64)
        if regression:
            self.out_proj.bias.fill_(float(y.mean()))
        else:
            counts = torch.bincount(y.long(), minlength=self.out_proj.bias.numel()).clamp_min(1).double()
            self.out_proj.bias.copy_((counts / counts.sum()).log())

    def pooled(self, hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(layers + 1, batch, width): every layer's [CLS] vector, or its mean over real tokens."""
        stacked = torch.stack(hidden_states)
        if self.pooling == "cls":
            return stacked[:, :, 0]
        if attention_mask is None:
            return stacked.mean(2)
        mask = attention_mask[None, :, :, None].to(stacked.dtype)
        return (stacked * mask).sum(2) / mask.sum(2).clamp_min(1.0)

    def forward(self, hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.from_pooled(self.pooled(hidden_states, attention_mask))

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from `pooled` (layers + 1, batch, width), e.g. features computed once."""
        mixed = self.layer_mix(pooled)
        return self.out_proj(self.dropout(F.relu(self.dense(self.dropout(mixed)))))


class LayerMixClassifier(nn.Module):
    """A sequence classifier: the HF encoder (under the attribute transformers gives it) and a
    `LayerMixHead` as `classifier`. Loss as transformers computes it for the config's problem
    type (MSE for regression, else cross entropy)."""

    def __init__(self, classifier: nn.Module, pooling: str) -> None:
        super().__init__()
        self.config = classifier.config
        self.base_model_prefix = classifier.base_model_prefix
        setattr(self, self.base_model_prefix, classifier.base_model)
        self.classifier = LayerMixHead(self.config, pooling)

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **inputs):
        from transformers.modeling_outputs import SequenceClassifierOutput  # here: importing diffprune stays light

        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                              return_dict=True, **inputs)
        logits = self.classifier(out.hidden_states, attention_mask)
        return SequenceClassifierOutput(loss=None if labels is None else self.loss(logits, labels), logits=logits)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        return F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))

    def save_pretrained(self, *args, **kwargs) -> None:
        raise DiffpruneError("a model with a mixed-layer head is no transformers architecture: keep it as a patch "
                             "(eval, predict and serving apply patches of every head)")


def start_from_labels(model: nn.Module, labels: list[float | int], regression: bool) -> None:
    """Start a mixed head's output at the training labels (`LayerMixHead.start_from_labels`);
    the model's own head keeps transformers' initialisation, as every recorded run of it had."""
    if isinstance(model, LayerMixClassifier) and labels:
        model.classifier.start_from_labels(labels, regression)


def with_head(classifier: nn.Module, head: str) -> nn.Module:
    """`classifier` (an HF sequence classifier) with the chosen head; the encoder is shared, not copied."""
    if check_head(head) == MODEL_HEAD:
        return classifier
    return LayerMixClassifier(classifier, POOLINGS[head])
