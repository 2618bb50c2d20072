"""Markdown tables from results/glue.jsonl, written between markers in benchmarks/README.md."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

BEGIN, END = "<!-- glue-table:begin -->", "<!-- glue-table:end -->"
TASK_ORDER = ["RTE", "MRPC", "STS-B", "SST-2", "CoLA", "QNLI", "QQP", "MNLI", "WNLI"]


def _label(r: dict) -> str:
    return r["method"] + (f" @{r['budget']:g}" if r.get("budget") else "")


def render(records: list[dict]) -> str:
    runs = [r for r in records if r.get("kind", "run") == "run"]
    if not runs:
        return "No runs recorded yet.\n"
    tasks = [t for t in TASK_ORDER if any(r["task"] == t for r in runs)]
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        cells[(_label(r), r["task"])].append(r)
    methods = sorted({_label(r) for r in runs}, key=lambda m: (m.split(" ")[0] != "full", m))
    full_tasks = {t for t in tasks if cells.get(("full", t))}

    lines = [
        "Dev score (median over seeds; n = seeds) on " + ", ".join(sorted({r["model"] for r in runs})) + ".",
        "Avg is over the tasks this method has in common with full finetuning; Δ is its difference to full.",
        "",
        "| method | " + " | ".join(f"{t} ({runs_metric(runs, t)})" for t in tasks)
        + " | avg | Δ vs full | trainable params | s/run (median) |",
        "|---" * (len(tasks) + 5) + "|",
    ]
    for m in methods:
        row, scores, full_scores, seconds, params = [], [], [], [], []
        for t in tasks:
            rs = cells.get((m, t), [])
            if not rs:
                row.append("–")
                continue
            score = statistics.median(r["score"] for r in rs)
            row.append(f"{100 * score:.1f} (n={len(rs)})")
            seconds += [r["seconds"] for r in rs]
            params += [r["trainable_params"] for r in rs]
            if t in full_tasks:
                scores.append(score)
                full_scores.append(statistics.median(r["score"] for r in cells[("full", t)]))
        avg = f"{100 * statistics.mean(scores):.1f}" if scores else "–"
        delta = f"{100 * (statistics.mean(scores) - statistics.mean(full_scores)):+.1f}" if scores else "–"
        lines.append(f"| {m} | " + " | ".join(row) + f" | {avg} | {delta} | {int(statistics.median(params)):,} | "
                     f"{statistics.median(seconds):.0f} |")
    lines += ["", "Every run:", "", "| run | score | trainable params | seconds | peak RSS MB | device |",
              "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['run']} | {100 * r['score']:.2f} | {r['trainable_params']:,} | {r['seconds']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['device']} |")
    return "\n".join(lines) + "\n"


def runs_metric(runs: list[dict], task: str) -> str:
    return next(r["metric"] for r in runs if r["task"] == task)


def write_table(results: Path, readme: Path) -> None:
    records = [json.loads(l) for l in results.read_text().splitlines() if l.strip()] if results.exists() else []
    text = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{BEGIN}\n{render(records)}{END}{tail}")
