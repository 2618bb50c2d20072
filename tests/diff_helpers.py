"""What the DiffModel tests share: a toy batch, a DiffModel over a base, random values."""

from __future__ import annotations

import torch

from diffprune.methods.diff.model import DiffModel

EMBEDDING = "bert.embeddings.word_embeddings.weight"


def toy_batch(seed: int = 0, vocab: tuple[int, int] = (1000, 1060)) -> dict[str, torch.Tensor]:
    """Three padded sequences over a small slice of the vocabulary (so most embedding rows are unused)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(*vocab, (3, 10), generator=g)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones_like(ids)
    ids[2, 7:], mask[2, 7:] = 0, 0  # padding
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1, 1])}


def wrap(base, k=100, structured=False, **kw) -> DiffModel:
    return DiffModel(base.model, list(base.base_names), k, structured=structured, **kw)


def randomise_w(dm: DiffModel, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in dm.w:
            w.copy_(torch.randn(w.shape, generator=g) * scale)


def added_tensors(dm: DiffModel) -> dict[str, torch.Tensor]:
    """Tensors that DiffModel holds itself (not those of the wrapped model)."""
    tensors = {**dict(dm.named_parameters()), **dict(dm.named_buffers())}
    return {n: t for n, t in tensors.items() if not n.startswith("model.")}
