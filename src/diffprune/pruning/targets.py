"""Which base tensors a pruning method prunes.

By default the encoder's Linear weights: attention query / key / value / output and the two
FFN matrices of every layer (the tensors the three papers prune; the embeddings, biases, norms,
pooler and head stay dense). They are found by module type and position, never by name: the
encoder's layer stack is the base model's largest nn.ModuleList (BERT's `encoder.layer`,
DistilBERT's `transformer.layer`, ...), and every nn.Linear inside it is taken.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from diffprune.errors import DiffpruneError
from diffprune.training.settings import option


def targets_option():
    return option("", "Comma-separated globs of base parameter names to prune; default: the encoder's Linear weights "
                  "(attention query/key/value/output and the two FFN matrices, found by module type).")


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The encoder's repeated layers: the ModuleList holding the most parameters under the base model."""
    core = getattr(model, "base_model", model)
    prefix = next((name for name, m in model.named_modules() if m is core), "")
    stacks = [(name, m) for name, m in core.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not stacks:
        raise DiffpruneError(f"found no stack of encoder layers in this {type(core).__name__}; "
                             "name the tensors to prune with --prune-include")
    name, stack = max(stacks, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return ".".join(filter(None, (prefix, name))), stack


def encoder_linear_weights(model: nn.Module) -> list[str]:
    """Names (in the model's parameter order) of the weight of every nn.Linear in the layer stack."""
    prefix, stack = layer_stack(model)
    names = [f"{prefix}.{name}.weight" for name, m in stack.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise DiffpruneError("the encoder's layers hold no nn.Linear; name the tensors to prune with --prune-include")
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return sorted(names, key=order.__getitem__)


def prune_targets(model: nn.Module, base_names: tuple[str, ...], include: str) -> list[str]:
    """The tensors to prune: those matching `include` (globs), or the encoder's Linear weights."""
    if not include.strip():
        return encoder_linear_weights(model)
    patterns = [p.strip() for p in include.split(",") if p.strip()]
    names = [n for n in base_names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    if not names:
        raise DiffpruneError(f"no base parameter matches --prune-include '{include}'")
    return names
