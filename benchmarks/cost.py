"""Training cost of a method against full finetuning, measured in the same run.

Step time: the loop's own `train_step` (forward, loss terms, backward, clipping, AdamW update)
on one fixed batch of real MRPC sentence pairs padded to 32 x 128 tokens, alternating the
methods step by step so that load on the machine hits all alike; the median of --steps each.
Every phase of a method is measured (diff pruning: the L0 phase and the fixed-mask phase, which
take as many epochs each), the fixed-mask phase on a mask spread over every tensor, as a
learned one is. Peak memory: each method and phase in its own fresh process (peak RSS after
--mem-steps steps), since a process's peak cannot be reset. Appends {"kind": "cost", "phase":
..., ...} records to results/cost.jsonl.

    python benchmarks/cost.py --methods diff-struct diff --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import diffprune

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass
class Setup:
    """One method in one of its phases, with that phase's optimiser, as the loop makes them."""

    base: Any
    model: torch.nn.Module
    phase: Any
    groups: list
    optimizer: Any
    scheduler: Any
    accelerator: Any
    phase_names: list[str]  # every phase of the method, in order
    options: dict  # the method's options, as this measure used them


def build(method_name: str, phase_index: int = 0) -> Setup:
    from accelerate import Accelerator

    from diffprune.base import load_base
    from diffprune.methods import build_method
    from diffprune.training.phases import build_optimizer, build_scheduler
    from diffprune.training.settings import TrainSettings

    torch.manual_seed(0)
    base = load_base(None, 2)
    method = build_method(method_name)
    model = method.prepare(base)
    phases = method.phases(model, base, TrainSettings(method=method_name, task="MRPC"))
    phase = phases[phase_index]
    if phase_index > 0 and hasattr(model, "w"):
        # A learned diff's mask touches nearly every tensor, and the fixed-mask phase's cost
        # depends on which tensors change: a random diff projects to such a spread mask.
        with torch.no_grad():
            for w in model.w:
                w.normal_(0.0, 1e-3)
    if phase.on_start:
        phase.on_start()
    groups = phase.param_groups()
    optimizer = build_optimizer(groups)
    scheduler = build_scheduler(optimizer, groups, 1000, 0.0)
    model.train()
    return Setup(base, model, phase, groups, optimizer, scheduler, Accelerator(cpu=True), [p.name for p in phases],
                 asdict(method.config))


def every_phase(methods: list[str]) -> dict[tuple[str, int], Setup]:
    """(method, phase index) -> its setup, for every phase of every method."""
    setups = {}
    for m in methods:
        first = setups[(m, 0)] = build(m, 0)
        for i in range(1, len(first.phase_names)):
            setups[(m, i)] = build(m, i)
    return setups


def train_one_step(s: Setup, batch: dict) -> None:
    from diffprune.training.loop import train_step

    train_step(s.accelerator, s.model, s.phase, s.groups, s.optimizer, s.scheduler, batch, weight=1.0,
               max_grad_norm=1.0)


def fixed_batch(tokenizer, size: int = 32, length: int = 128) -> dict[str, torch.Tensor]:
    from diffprune.glue import load_split

    examples = load_split("MRPC", "train", REPO / "data" / "glue")[:size]
    batch = tokenizer([e.texts[0] for e in examples], [e.texts[1] for e in examples], padding="max_length",
                      truncation=True, max_length=length, return_tensors="pt")
    batch["labels"] = torch.tensor([e.label for e in examples])
    return dict(batch)


# after_step is told the steps are these of a 1000-step phase: the middle, where a density
# controller or a pruning schedule is at work (adapting by pruning's shift starts at a quarter).
MID_PHASE = 500


def step_times(setups: dict[tuple[str, int], Setup], steps: int, warmup: int = 2) -> dict[tuple[str, int], list[float]]:
    """Seconds per training step of each (method, phase index), measured in turns."""
    batch = fixed_batch(next(iter(setups.values())).base.tokenizer)
    times: dict[tuple[str, int], list[float]] = {t: [] for t in setups}
    for i in range(warmup + steps):
        for target, setup in setups.items():
            start = time.perf_counter()
            train_one_step(setup, batch)
            if setup.phase.after_step:
                setup.phase.after_step(MID_PHASE + i + 1, 1000)
            if i >= warmup:
                times[target].append(time.perf_counter() - start)
    return times


def peak_rss_of(method: str, phase_index: int, steps: int) -> float:
    """Peak RSS (MB) of a fresh process that loads the base, wraps it and trains `steps` steps
    of one phase."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", method, "--phase-index", str(phase_index),
                          "--mem-steps", str(steps)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def weight_gradient(phase: str) -> dict[str, str]:
    """How a fixed-mask phase forms its values' gradient (since 2026-12-07 on the CPU: only the
    k sampled entries, diffprune.methods.diff.sparse_grad; before: the dense weight gradient)."""
    if phase != "fixed-mask":
        return {}
    return {"weight_gradient": "k sampled" if not torch.cuda.is_available() else "dense"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["diff-struct"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--phase-index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:  # child process: measure one method's peak memory
        from diffprune.api import peak_rss_mb

        setup = build(args.memory_of, args.phase_index)
        batch = fixed_batch(setup.base.tokenizer)
        for _ in range(args.mem_steps):
            train_one_step(setup, batch)
        print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
        return

    setups = every_phase(["full", *args.methods])
    times = step_times(setups, args.steps)
    full_time = statistics.median(times[("full", 0)])
    full_mem = peak_rss_of("full", 0, args.mem_steps)
    records = []
    for (m, i), setup in list(setups.items())[1:]:
        mem = peak_rss_of(m, i, args.mem_steps)
        step = statistics.median(times[(m, i)])
        records.append({
            "kind": "cost", "method": m, "phase": setup.phase_names[i], "baseline": "full",
            "model": "sentence-transformers/all-MiniLM-L6-v2", "batch": "32 x 128 tokens (MRPC train pairs)",
            "steps": args.steps, "after_step_at": f"{MID_PHASE}+ of 1000", "step_seconds": round(step, 4), "baseline_step_seconds": round(full_time, 4),
            "step_time_ratio": round(step / full_time, 3),
            "peak_rss_mb": mem, "baseline_peak_rss_mb": full_mem, "peak_memory_ratio": round(mem / full_mem, 3),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
            **weight_gradient(setup.phase_names[i]), "method_options": setup.options,
            "diffprune_version": diffprune.__version__, "loadavg": [round(x, 2) for x in os.getloadavg()],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
    out = HERE / "results" / "cost.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            print(json.dumps(r))


if __name__ == "__main__":
    main()
