"""Training cost of a method against full finetuning, measured in the same run.

Step time: the loop's own `train_step` (forward, loss terms, backward, clipping, AdamW update)
on one fixed batch of real MRPC sentence pairs padded to 32 x 128 tokens, alternating the two
methods step by step so that load on the machine hits both alike; the median of --steps each.
Peak memory: each method in its own fresh process (peak RSS after --mem-steps steps), since a
process's peak cannot be reset. Appends {"kind": "cost", ...} records to results/cost.jsonl.

    python benchmarks/cost.py --methods diff-struct diff --steps 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def build(method_name: str, options: dict | None = None):
    """A base model wrapped by the method, with its first phase's optimiser, as the loop makes them."""
    from accelerate import Accelerator

    from diffprune.base import load_base
    from diffprune.methods import build_method
    from diffprune.training.phases import build_optimizer, build_scheduler
    from diffprune.training.settings import TrainSettings

    torch.manual_seed(0)
    base = load_base(None, 2)
    method = build_method(method_name, options)
    model = method.prepare(base)
    settings = TrainSettings(method=method_name, task="MRPC")
    phase = method.phases(model, base, settings)[0]
    if phase.on_start:
        phase.on_start()
    groups = phase.param_groups()
    optimizer = build_optimizer(groups)
    scheduler = build_scheduler(optimizer, groups, 1000, 0.0)
    model.train()
    return base, model, phase, groups, optimizer, scheduler, Accelerator(cpu=True)


def fixed_batch(tokenizer, size: int = 32, length: int = 128) -> dict[str, torch.Tensor]:
    from diffprune.glue import load_split

    examples = load_split("MRPC", "train", REPO / "data" / "glue")[:size]
    batch = tokenizer([e.texts[0] for e in examples], [e.texts[1] for e in examples], padding="max_length",
                      truncation=True, max_length=length, return_tensors="pt")
    batch["labels"] = torch.tensor([e.label for e in examples])
    return dict(batch)


def step_times(methods: list[str], steps: int, warmup: int = 2) -> dict[str, list[float]]:
    from diffprune.training.loop import train_step

    runs = {m: build(m) for m in methods}
    batch = fixed_batch(runs[methods[0]][0].tokenizer)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(warmup + steps):
        for m, (base, model, phase, groups, opt, sched, acc) in runs.items():
            start = time.perf_counter()
            train_step(acc, model, phase, groups, opt, sched, batch, weight=1.0, max_grad_norm=1.0)
            if phase.after_step:
                phase.after_step(i + 1, 1000)
            if i >= warmup:
                times[m].append(time.perf_counter() - start)
    return times


def peak_rss_of(method: str, steps: int) -> float:
    """Peak RSS (MB) of a fresh process that loads the base, wraps it and trains `steps` steps."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", method, "--mem-steps", str(steps)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["diff-struct"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:  # child process: measure one method's peak memory
        from diffprune.api import peak_rss_mb
        from diffprune.training.loop import train_step

        base, model, phase, groups, opt, sched, acc = build(args.memory_of)
        batch = fixed_batch(base.tokenizer)
        for _ in range(args.mem_steps):
            train_step(acc, model, phase, groups, opt, sched, batch, weight=1.0, max_grad_norm=1.0)
        print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
        return

    times = step_times(["full", *args.methods], args.steps)
    full_time = statistics.median(times["full"])
    full_mem = peak_rss_of("full", args.mem_steps)
    records = []
    for m in args.methods:
        mem = peak_rss_of(m, args.mem_steps)
        records.append({
            "kind": "cost", "method": m, "baseline": "full", "model": "sentence-transformers/all-MiniLM-L6-v2",
            "batch": "32 x 128 tokens (MRPC train pairs)", "steps": args.steps,
            "step_seconds": round(statistics.median(times[m]), 4), "baseline_step_seconds": round(full_time, 4),
            "step_time_ratio": round(statistics.median(times[m]) / full_time, 3),
            "peak_rss_mb": mem, "baseline_peak_rss_mb": full_mem, "peak_memory_ratio": round(mem / full_mem, 3),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        })
    out = HERE / "results" / "cost.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            print(json.dumps(r))


if __name__ == "__main__":
    main()
