"""Running batches of requests for many tasks on the one base.

A batch's requests are grouped: the rows of every task that can join a mixed batch run in one
forward with no patch applied (mixed.py); a task alone in its batch, or one whose patch cannot
join (mask and sparse-model patches), runs by switching: its patch applied in place with the
model's head left alone, the batch run, the patch reverted (apply.py); or, where the bank serves
pruning patches on the sparse runtime, on the task's own sparse model (sparse_tasks.py). Every
row runs with its own task's head (heads.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffprune.errors import DiffpruneError
from diffprune.patch.apply import apply_patch
from diffprune.serving.bank import LoadedTask, TaskBank
from diffprune.serving.heads import forward_with_heads
from diffprune.serving.mixed import MixedBatch

Input = str | tuple[str, str]


@dataclass
class Request:
    task: str
    inputs: list[Input]


class Engine:
    """Predictions for requests of any tasks of `bank`, batched together."""

    def __init__(self, bank: TaskBank, mixed: bool = True) -> None:
        self.bank, self.mixed = bank, mixed
        self.switches = self.mixed_batches = self.sparse_batches = 0  # how batches ran, for the metrics

    def run(self, requests: list[Request]) -> list[list[dict] | DiffpruneError]:
        """Each request's predictions, or the error that stopped it (an unknown task, a patch
        that cannot be read); one request's error never fails the others."""
        tasks: dict[str, LoadedTask | DiffpruneError] = {}
        for name in dict.fromkeys(r.task for r in requests):
            try:
                tasks[name] = self.bank.get(name)
            except DiffpruneError as e:
                tasks[name] = e
        results: list = [tasks[r.task] if isinstance(tasks[r.task], DiffpruneError) else None for r in requests]
        live = [i for i, r in enumerate(requests) if results[i] is None]
        for group in self._groups([requests[i].task for i in live], tasks):
            members = [i for i in live if requests[i].task in group]
            try:
                outputs = self._forward([tasks[t] for t in group],
                                        [(group.index(requests[i].task), requests[i].inputs) for i in members])
            except DiffpruneError as e:  # this group's tasks fail; the other groups still run
                outputs = [e] * len(members)
            for i, out in zip(members, outputs):
                results[i] = out
        return results

    def _groups(self, names: list[str], tasks: dict[str, LoadedTask]) -> list[list[str]]:
        distinct = list(dict.fromkeys(names))
        mixable = [t for t in distinct if self.mixed and tasks[t].mix_problem is None]
        groups = [mixable] if len(mixable) > 1 else [[t] for t in mixable]
        return groups + [[t] for t in distinct if t not in mixable]

    def _forward(self, slots: list[LoadedTask], parts: list[tuple[int, list[Input]]]) -> list[list[dict]]:
        """Run the rows of `parts` ((slot, inputs) each) in one forward; each part's predictions."""
        base = self.bank.base
        encoded, row_slots = _encode(base.tokenizer, slots, parts)
        device = next(base.model.parameters()).device
        encoded = {k: v.to(device) for k, v in encoded.items()}
        heads, kinds = [t.head for t in slots], [t.head_kind for t in slots]
        with torch.no_grad():
            if len(slots) == 1 and slots[0].sparse_problem is None:
                self.sparse_batches += 1
                logits = forward_with_heads(self.bank.sparse_model(slots[0]), heads, kinds, row_slots, encoded)
            elif len(slots) == 1:
                self.switches += 1
                with apply_patch(slots[0].patch, base, head=False):
                    logits = forward_with_heads(base, heads, kinds, row_slots, encoded)
            else:
                self.mixed_batches += 1
                with MixedBatch(base.model, [t.diffs for t in slots], row_slots).installed():
                    logits = forward_with_heads(base, heads, kinds, row_slots, encoded)
        results, start = [], 0
        for slot, inputs in parts:
            rows = logits[start: start + len(inputs), : slots[slot].num_outputs].float().cpu()
            results.append([_prediction(slots[slot], row) for row in rows])
            start += len(inputs)
        return results


def _encode(tokenizer, slots: list[LoadedTask], parts: list[tuple[int, list[Input]]]):
    """Tokenize every part with its task's own truncation, padded together."""
    features, row_slots = [], []
    for slot, inputs in parts:
        length = slots[slot].max_length
        for item in inputs:
            first, second = (item, None) if isinstance(item, str) else item
            features.append(tokenizer(first, second, truncation=True, max_length=length))
            row_slots.append(slot)
    encoded = tokenizer.pad(features, return_tensors="pt")
    return dict(encoded), torch.tensor(row_slots, dtype=torch.int64)


def _prediction(task: LoadedTask, logits: torch.Tensor) -> dict:
    if task.regression:
        return {"value": float(logits[0])}
    scores = torch.softmax(logits, dim=-1)
    best = int(scores.argmax())
    return {"label": task.labels[best], "scores": {label: float(s) for label, s in zip(task.labels, scores)}}
