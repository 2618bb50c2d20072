"""What the patch tests share: toy inputs, logits, a random patch of every tensor, a model's state."""

import torch

from diffprune.patch import TaskPatch


def toy_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (3, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits_of(model):
    with torch.no_grad():
        return model(**toy_inputs()).logits


def random_patch(base, density=0.05, seed=0, **meta):
    g = torch.Generator().manual_seed(seed)
    dense = {}
    for name, p in base.base_parameters().items():
        mask = torch.rand(p.shape, generator=g) < density
        dense[name] = torch.randn(p.shape, generator=g) * 0.05 * mask
    head = {n: torch.randn(p.shape, generator=g) for n, p in base.head_parameters().items()}
    meta = {"base": base.name, "fingerprint": base.fingerprint, "method": "random", "task": "toy", **meta}
    return TaskPatch.from_dense_diffs(dense, head, meta), dense, head


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
