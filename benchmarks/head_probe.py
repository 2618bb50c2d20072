"""Which head reads a frozen encoder: each head of diffprune.heads trained alone on features
computed once, the question behind the head every frozen-encoder benchmark row uses.

The encoder runs once over the first --train-examples training pairs and the whole dev set
(every layer's [CLS] vector and token mean, and the pooler output); then each head trains on
those features for --epochs at batch 32, AdamW (weight decay 0.01), 10% warmup and linear decay,
at each --lrs rate, with the library's own modules and initialisation: `model` is BERT's head (a
fresh Linear on the pretrained pooler output, dropout 0.1), `cls-mix` and `mean-mix` are
`LayerMixHead`, started at the training labels as training starts them. A probe of the head
alone, not a training run: no mask, no encoder dropout, fewer examples. Usage:

    python benchmarks/head_probe.py --data-dir ../shared/data/glue --tasks STS-B MRPC
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import diffprune
from diffprune.api import load_task_data
from diffprune.base import load_base
from diffprune.glue import get_task, make_collator
from diffprune.glue.metrics import compute_metrics, predictions_from_logits
from diffprune.heads import HEADS, POOLINGS, LayerMixHead
from diffprune.training.settings import TrainSettings

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "head_probe.jsonl"


@torch.no_grad()
def features(base, dataset, collator) -> dict[str, torch.Tensor]:
    """{"cls", "mean"}: (layers + 1, examples, width); "pooler": (examples, width)."""
    encoder, parts = base.model.base_model.eval(), {"cls": [], "mean": [], "pooler": []}
    for start in range(0, len(dataset), 64):
        batch = collator([dataset[i] for i in range(start, min(start + 64, len(dataset)))])
        batch.pop("labels")
        out = encoder(**batch, output_hidden_states=True)
        stacked, mask = torch.stack(out.hidden_states), batch["attention_mask"][None, :, :, None].float()
        parts["cls"].append(stacked[:, :, 0])
        parts["mean"].append((stacked * mask).sum(2) / mask.sum(2))
        parts["pooler"].append(out.pooler_output)
    return {k: torch.cat(v, dim=1 if k != "pooler" else 0) for k, v in parts.items()}


def head_for(kind: str, config, labels: list, regression: bool) -> tuple[nn.Module, callable]:
    """The head module and how it turns cached features into logits."""
    if kind == "model":
        linear = nn.Linear(config.hidden_size, config.num_labels)
        nn.init.normal_(linear.weight, std=config.initializer_range)
        nn.init.zeros_(linear.bias)
        dropout = nn.Dropout(config.hidden_dropout_prob)
        return nn.ModuleList([linear, dropout]), lambda f: linear(dropout(f["pooler"]))
    head = LayerMixHead(config, POOLINGS[kind])
    head.start_from_labels(labels, regression)
    return head, lambda f: head.from_pooled(f[POOLINGS[kind]])


def train_head(kind: str, lr: float, config, train: dict, dev: dict, spec, epochs: float, seed: int) -> float:
    """Train one head on cached features; its dev score (the task's main metric)."""
    head, logits_of = fit_head(kind, lr, config, train, spec, epochs, seed)
    with torch.no_grad():
        predictions = predictions_from_logits(spec, logits_of(dev).numpy())
    return compute_metrics(spec, predictions, dev["labels"].numpy())["score"]


def fit_head(kind: str, lr: float, config, train: dict, spec, epochs: float, seed: int) -> tuple[nn.Module, callable]:
    """One head trained on cached features (in eval mode), and how it turns features into logits."""
    torch.manual_seed(seed)
    labels = train["labels"]
    regression = spec.is_regression
    head, logits_of = head_for(kind, config, labels.tolist(), regression)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    n = len(labels)
    steps = max(1, round(epochs * (n // 32)))
    warmup = max(1, round(0.1 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / (steps - warmup)))
    order = torch.Generator().manual_seed(seed)
    head.train()
    for step in range(steps):
        rows = torch.randint(0, n, (32,), generator=order)
        picked = {k: (v[:, rows] if v.dim() == 3 else v[rows]) for k, v in train.items() if k != "labels"}
        out = logits_of(picked)
        loss = F.mse_loss(out.squeeze(-1), labels[rows].float()) if regression else F.cross_entropy(out, labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return head.eval(), logits_of


def cached(task: str, data_dir: str | None, train_examples: int) -> tuple:
    """(task spec, base, {"train", "dev"}: features with their labels, {"train", "dev"}: the datasets)."""
    spec = get_task(task)
    base = load_base(None, spec.num_labels, labels=spec.labels, regression=spec.is_regression)
    settings = TrainSettings(task=task, data_dir=data_dir, max_train_samples=train_examples)
    data = load_task_data(spec, base, settings)
    collator = make_collator(base.tokenizer)
    splits, datasets = {}, {"train": data.train, "dev": next(iter(data.dev.values()))}
    for name, dataset in datasets.items():
        splits[name] = features(base, dataset, collator)
        splits[name]["labels"] = torch.tensor([e.label for e in dataset.examples])
    return spec, base, splits, datasets


def render(records: list[dict]) -> str:
    if not records:
        return "No head probes recorded yet.\n"
    rates = sorted({r["lr"] for r in records})
    lines = ["| task | train examples | epochs | head | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |",
             "|---" * (4 + len(rates)) + "|"]
    keys = sorted({(r["task"], r["train_examples"], r["epochs"], r["head"]) for r in records},
                  key=lambda k: (k[0], k[1], k[2], HEADS.index(k[3])))
    for task, n, epochs, head in keys:
        cells = []
        for lr in rates:
            scores = [r["score"] for r in records if (r["task"], r["train_examples"], r["epochs"], r["head"], r["lr"])
                      == (task, n, epochs, head, lr)]
            cells.append(f"{100 * statistics.median(scores):.1f}" if scores else "–")
        lines.append(f"| {task} | {n:,} | {epochs:g} | {head} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table() -> None:
    from table import write_section  # the other benchmarks' section markers

    write_section(HERE / "README.md", "head-probe-table", RESULTS, render)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["STS-B", "MRPC"])
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default: $GLUE_DIR)")
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    for task in [] if args.table_only else args.tasks:
        load = os.getloadavg()[0]
        started = time.perf_counter()
        spec, base, splits, _ = cached(task, args.data_dir, args.train_examples)
        with open(RESULTS, "a") as f:
            for head in HEADS:
                for lr in args.lrs:
                    score = train_head(head, lr, base.model.config, splits["train"], splits["dev"], spec,
                                       args.epochs, args.seed)
                    print(f"{task} {head} lr {lr:g}: {100 * score:.1f}", flush=True)
                    f.write(json.dumps({"task": task, "head": head, "lr": lr, "score": score, "seed": args.seed,
                                        "train_examples": len(splits["train"]["labels"]), "epochs": args.epochs,
                                        "dev_examples": len(splits["dev"]["labels"]), "model": base.name,
                                        "library_version": diffprune.__version__, "loadavg_at_start": load,
                                        "seconds_task": round(time.perf_counter() - started, 1)}) + "\n")
    write_table()


if __name__ == "__main__":
    main()
