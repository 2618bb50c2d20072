"""Which half of a frozen encoder's weights to keep: one-shot masks probed with the head alone.

The question behind adapting by pruning's missed goal (benchmarks/README.md): its learned 50%
mask scores far below gradual magnitude pruning on STS-B. Does any mask chosen from the task's
gradient beat magnitude on the packaged model, or is magnitude the best a 50% mask of MiniLM
can do? Each mask is per matrix over the encoder's Linear weights (as the magnitude baseline),
at --sparsity, chosen once by a score:

* magnitude: |W|;
* random: a uniform draw;
* taylor: |W * G| (first-order estimate of the loss change of removing an entry, Molchanov et
  al. 2019), G the task loss's gradient summed over --grad-examples training pairs;
* movement: -W * G (Sanh et al. 2020's first-order movement score at its first step: keep the
  entries whose removal would raise the loss most; what abp's scores follow under plain SGD).

G comes through the mean-mix head trained on the unmasked encoder's features (head_probe). For
each mask the masked encoder's features are computed once and a fresh mean-mix head is trained on
them (head_probe.fit_head: --epochs, lr --lr); its dev score is recorded. A probe, not a training
run: one-shot masks, no encoder dropout, --train-examples training pairs. Usage:

    python benchmarks/mask_probe.py --data-dir ../shared/data/glue --task STS-B
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import diffprune
from diffprune.glue import make_collator
from diffprune.glue.metrics import compute_metrics, predictions_from_logits
from diffprune.pruning.targets import encoder_linear_weights
from diffprune.pruning.topk import keep_masks, kept_count
from head_probe import cached, features, fit_head

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "mask_probe.jsonl"
SCORERS = ("magnitude", "random", "taylor", "movement")


def task_gradient(base, dataset, head, names: list[str], examples: int, regression: bool) -> list[torch.Tensor]:
    """Sum over the first `examples` training pairs of d loss / d W for each named weight."""
    model, collator = base.model, make_collator(base.tokenizer)
    weights = [model.get_parameter(n) for n in names]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    encoder = model.base_model.eval()
    for start in range(0, min(examples, len(dataset)), 32):
        batch = collator([dataset[i] for i in range(start, min(start + 32, examples, len(dataset)))])
        labels = batch.pop("labels")
        out = encoder(**batch, output_hidden_states=True)
        stacked, mask = torch.stack(out.hidden_states), batch["attention_mask"][None, :, :, None].float()
        logits = head.from_pooled((stacked * mask).sum(2) / mask.sum(2))
        loss = F.mse_loss(logits.squeeze(-1), labels.float()) if regression else F.cross_entropy(logits, labels)
        loss.backward()
    grads = [w.grad.detach().clone() for w in weights]
    for w in weights:
        w.requires_grad_(False)
        w.grad = None
    return grads


def mask_scores(scorer: str, weights: list[torch.Tensor], grads: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    if scorer == "magnitude":
        return [w.abs() for w in weights]
    if scorer == "random":
        g = torch.Generator().manual_seed(seed)
        return [torch.rand(w.shape, generator=g) for w in weights]
    if scorer == "taylor":
        return [(w * g).abs() for w, g in zip(weights, grads)]
    return [-(w * g) for w, g in zip(weights, grads)]


def probe(args) -> None:
    spec, base, splits, datasets = cached(args.task, args.data_dir, args.train_examples)
    config, regression = base.model.config, spec.is_regression
    head, _ = fit_head("mean-mix", args.lr, config, splits["train"], spec, args.epochs, args.seed)
    names = encoder_linear_weights(base.model)
    dataset_train, dataset_dev = datasets["train"], datasets["dev"]
    grads = task_gradient(base, dataset_train, head, names, args.grad_examples, regression)
    weights = [base.model.get_parameter(n) for n in names]
    originals = [w.detach().clone() for w in weights]
    k = kept_count(args.sparsity, sum(w.numel() for w in weights))
    collator = make_collator(base.tokenizer)
    for scorer in SCORERS:
        started, load = time.perf_counter(), os.getloadavg()[0]
        keep = keep_masks(mask_scores(scorer, originals, grads, args.seed), k, "per-matrix")
        with torch.no_grad():
            for w, original, kept in zip(weights, originals, keep):
                w.copy_(original * kept)
        masked = {name: features(base, d, collator) for name, d in (("train", dataset_train), ("dev", dataset_dev))}
        for name in masked:
            masked[name]["labels"] = splits[name]["labels"]
        trained, logits_of = fit_head("mean-mix", args.lr, config, masked["train"], spec, args.epochs, args.seed)
        with torch.no_grad():
            predictions = predictions_from_logits(spec, logits_of(masked["dev"]).numpy())
        score = compute_metrics(spec, predictions, masked["dev"]["labels"].numpy())["score"]
        print(f"{args.task} {scorer} at {args.sparsity:.0%}: {100 * score:.1f}", flush=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"task": args.task, "scorer": scorer, "sparsity": args.sparsity, "score": score,
                                "head": "mean-mix", "lr": args.lr, "epochs": args.epochs, "seed": args.seed,
                                "train_examples": len(dataset_train), "grad_examples": args.grad_examples,
                                "dev_examples": len(dataset_dev), "model": base.name, "scope": "per-matrix",
                                "library_version": diffprune.__version__, "loadavg_at_start": load,
                                "seconds": round(time.perf_counter() - started, 1)}) + "\n")
    with torch.no_grad():
        for w, original in zip(weights, originals):
            w.copy_(original)


def render(records: list[dict]) -> str:
    if not records:
        return "No mask probes recorded yet.\n"
    keys = sorted({(r["task"], r["train_examples"], r["grad_examples"]) for r in records})
    rates = sorted({r["sparsity"] for r in records})
    lines = ["| task | train / gradient examples | mask | " + " | ".join(f"{s:.0%} pruned" for s in rates) + " |",
             "|---" * (3 + len(rates)) + "|"]
    for task, n, g in keys:
        for scorer in SCORERS:
            cells = [next((f"{100 * r['score']:.1f}" for r in reversed(records) if (r["task"], r["train_examples"],
                           r["grad_examples"], r["scorer"], r["sparsity"]) == (task, n, g, scorer, s)), "–")
                     for s in rates]
            lines.append(f"| {task} | {n:,} / {g:,} | {scorer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table() -> None:
    from table import write_section  # the other benchmarks' section markers

    write_section(HERE / "README.md", "mask-probe-table", RESULTS, render)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="STS-B")
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default: $GLUE_DIR)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--grad-examples", type=int, default=512)
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        probe(args)
    write_table()


if __name__ == "__main__":
    main()
