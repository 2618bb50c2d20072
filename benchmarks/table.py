"""Markdown tables from results/glue.jsonl, written between markers in benchmarks/README.md."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from diffprune.io import write_text

TASK_ORDER = ["RTE", "MRPC", "STS-B", "SST-2", "CoLA", "QNLI", "QQP", "MNLI", "WNLI"]


def _label(r: dict) -> str:
    rank = r.get("settings", {}).get("lora_r")
    return (r["method"] + (f" @{r['budget']:g}" if r.get("budget") else "") + (f" r{rank}" if rank else "")
            + (f" s{r['sparsity']:g}" if r.get("sparsity") is not None else "") + (f" {r['variant']}" if r.get("variant") else ""))


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
    lines += ["", "Every run (learned density: nonzero share of z * w at the projection, before the top-k;",
              "artifact: the .safetensors bytes kept for the task, fp32 patch values here):", "",
              "| run | score | per-epoch dev | learned density | trainable params | artifact bytes | seconds | "
              "peak RSS MB | device |", "|---" * 9 + "|"]
    for r in runs:
        density = f"{100 * r['learned_density']:.3f}%" if r.get("learned_density") is not None else "–"
        artifact = f"{r['artifact_bytes']:,}" if r.get("artifact_bytes") else "–"
        epochs = ", ".join(f"{100 * e['score']:.1f}" for e in r.get("evals", []))
        lines.append(f"| {r['run']} | {100 * r['score']:.2f} | {epochs} | {density} | {r['trainable_params']:,} | "
                     f"{artifact} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | {r['device']} |")
    return "\n".join(lines) + "\n"


# Full finetuning's dev floors on the packaged MiniLM, from the foundation issue.
FULL_FLOORS = {"RTE": 0.55, "MRPC": 0.85, "STS-B": 0.82, "SST-2": 0.87}


# The head of every benchmark run whose encoder stays frozen (the mask methods and head-only;
# run_glue.py sets it): the mean-pooled mix of every layer, what a sentence encoder like MiniLM
# is read by. Their records made with the model's own head are in glue-mask-model-head.jsonl.
FROZEN_ENCODER_HEAD = "mean-mix"
# The adapting-by-pruning issue's goals: abp at 50% within 2.0 points of full finetuning, above
# gradual magnitude and random masks at every sparsity, above head-only at 50% and 90%.
_H = FROZEN_ENCODER_HEAD
ABP_GOALS = [(f"abp s0.5 {_H}", "full", -2.0, "within 2.0 points of full finetuning"),
             *[(f"abp s{s:g} {_H}", f"{other} s{s:g} {_H}", 0.0, f"above {other} at the same sparsity")
               for s in (0.5, 0.9) for other in ("magnitude", "random-mask")],
             *[(f"abp s{s:g} {_H}", f"head {_H}", 0.0, "above head-only (feature extraction)") for s in (0.5, 0.9)]]
# The pruning-at-distilling issue's goals: distil at 95% within 1.5 points of its teacher (full
# finetuning, seed 1: the fast profile's only full run), at least 2 points above gradual
# magnitude pruning of the finetuned model at 95%, above the 1-layer dense student.
DISTIL_GOALS = [("distil s0.95", "full", -1.5, "within 1.5 points of the teacher (full finetuning)"),
                ("distil s0.95", "distil s0.95 gmp lr3e-05", 2.0,
                 "at least 2.0 points above gradual magnitude pruning (at a finetuning rate, 3e-5)"),
                ("distil s0.95", "distil s0 L1", 0.0, "above the 1-layer dense student (17% of the weights)"),
                # the paper's 12 epochs (four times the profile's), on the tasks measured so far
                ("distil s0.95 x4-epochs", "full", -1.5,
                 "within 1.5 points of the teacher, with 4x the epochs (12 where the profile runs 3: the paper's)")]


def render_goals(records: list[dict], measured_only: bool = False) -> str:
    """The diff-pruning issue's quality goals, each checked on the tasks both sides have measured,
    then full finetuning's floors; `measured_only`: only the goals of methods with records."""
    runs = [r for r in records if r.get("kind", "run") == "run"]
    cells: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        cells[_label(r)][r["task"]].append(r)
    patch = cells.get("diff-struct @0.005", {})
    patch_bytes = statistics.median(r["artifact_bytes"] for rs in patch.values() for r in rs) if patch else 0
    big_loras = [m for m, by_task in cells.items() if m.startswith("lora") and
                 statistics.median(r["artifact_bytes"] for rs in by_task.values() for r in rs) >= patch_bytes]
    goals = [("diff-struct @0.005", "full", -1.0, "within 1.0 point of full finetuning"),
             ("diff-struct @0.001", "full", -1.5, "within 1.5 points of full finetuning"),
             ("diff-struct @0.005", "bitfit", 0.0, "above BitFit"),
             *[("diff-struct @0.005", m, 0.0, f"above LoRA {m.split()[-1]} (adapter ≥ the {patch_bytes:,.0f} B patch)")
               for m in sorted(big_loras)],
             ("diff-struct @0.005", "shira @0.005", 0.0, "above SHiRA with about as many changed entries")]
    if not big_loras:
        goals.append(("diff-struct @0.005", None, 0.0, f"above LoRA at a rank whose adapter ≥ the {patch_bytes:,.0f} B patch"))
    goals += ABP_GOALS + DISTIL_GOALS
    lines = ["| goal | tasks compared (seeds each side) | method avg | other avg | Δ | met |", "|---|---|---|---|---|---|"]
    for method, other, margin, text in goals:
        if measured_only and method not in cells:
            continue
        common = sorted(set(cells.get(method, {})) & set(cells.get(other, {})), key=TASK_ORDER.index)
        if not common:
            lines.append(f"| {method}: {text} | not measured yet | – | – | – | – |")
            continue
        mine = statistics.mean(statistics.median(r["score"] for r in cells[method][t]) for t in common)
        theirs = statistics.mean(statistics.median(r["score"] for r in cells[other][t]) for t in common)
        seeds = ", ".join(f"{t} {len(cells[method][t])}/{len(cells[other][t])}" for t in common)
        delta = 100 * (mine - theirs)  # points, as the margins are stated
        met = "yes" if (delta >= margin if margin else delta > 0) else "no"
        lines.append(f"| {method}: {text} | {seeds} | {100 * mine:.1f} | {100 * theirs:.1f} | "
                     f"{delta:+.1f} | {met} |")
    for task, floor in FULL_FLOORS.items():
        scores = [r["score"] for r in cells.get("full", {}).get(task, [])]
        if not scores:
            lines.append(f"| full: {task} at least {100 * floor:.0f} (the foundation's floor) | not measured yet | – | – | – | – |")
            continue
        median = statistics.median(scores)
        lines.append(f"| full: {task} at least {100 * floor:.0f} (the foundation's floor) | {task} {len(scores)} | "
                     f"{100 * median:.1f} | {100 * floor:.1f} | {100 * (median - floor):+.1f} | "
                     f"{'yes' if median >= floor else 'no'} |")
    return "\n".join(lines) + "\n"


def runs_metric(runs: list[dict], task: str) -> str:
    return next(r["metric"] for r in runs if r["task"] == task)


def render_cost(records: list[dict]) -> str:
    if not records:
        return "No cost measurement yet (`python benchmarks/cost.py`).\n"
    by_phase: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:  # a phase measured before and after a change of how it computes: two rows
        gradient = r.get("weight_gradient", "dense" if r["phase"] == "fixed-mask" else None)
        by_phase[(r["method"], r["phase"] + (f" ({gradient} weight gradient)" if gradient else ""))].append(r)
    lines = ["| method | phase | runs | step time ratio (median; each run) | peak memory ratio (median; each run) | "
             "step s / full step s (median run) | peak RSS MB / full | batch | device |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (method, phase), rs in by_phase.items():
        times = [r["step_time_ratio"] for r in rs]
        mems = [r["peak_memory_ratio"] for r in rs]
        mid = sorted(rs, key=lambda r: r["step_time_ratio"])[len(rs) // 2]
        lines.append(f"| {method} | {phase} | {len(rs)} | **{statistics.median(times):.2f}x** ({', '.join(f'{t:.2f}' for t in times)}) | "
                     f"**{statistics.median(mems):.2f}x** ({', '.join(f'{m:.2f}' for m in mems)}) | "
                     f"{mid['step_seconds']:.2f} / {mid['baseline_step_seconds']:.2f} | "
                     f"{mid['peak_rss_mb']:.0f} / {mid['baseline_peak_rss_mb']:.0f} | {mid['batch']} | {mid['device']} |")
    return "\n".join(lines) + "\n"


def render_storage(records: list[dict]) -> str:
    if not records:
        return "No storage measurement yet (`python benchmarks/storage.py`).\n"
    lines = ["| patch | nnz (by kind) | bound B | fp32 B | fp16 B | fp16 / bound | full copy / fp16 | dev fp32 | "
             "dev fp16 | dev bf16 | apply + revert ms | revert exact | LoRA r8 adapter B |", "|---" * 13 + "|"]
    for r in records:
        b, d = r["bytes"], r["dev_score"]
        lora = f"{r['lora_r8_adapter_bytes']:,}" if r.get("lora_r8_adapter_bytes") else "–"
        kinds = ", ".join(f"{k} {n:,}" for k, n in r.get("nnz_by_kind", {"add": r["nnz"]}).items() if n)
        copy = f"{r['full_copy_bytes'] / b['float16']:.0f}x" if r.get("full_copy_bytes") else "–"
        lines.append(f"| {r['patch']} | {kinds} | {r['bound_bytes']:,} | {b['float32']:,} | {b['float16']:,} | "
                     f"{r['bytes_over_bound_fp16']:.3f} | {copy} | {100 * d['float32']:.2f} | {100 * d['float16']:.2f} | "
                     f"{100 * d['bfloat16']:.2f} | {r['apply_revert_ms']:.2f} | {r['revert_bit_exact']} | {lora} |")
    return "\n".join(lines) + "\n"


def render_study(records: list[dict]) -> str:
    if not records:
        return "No study runs recorded yet.\n"
    lines = ["| run | variant | dev score | per-epoch dev | learned density | nnz |", "|---|---|---|---|---|---|"]
    for r in records:
        evals = ", ".join(f"{e['phase']} {100 * e['score']:.1f}" for e in r.get("evals", []))
        density = f"{100 * r['learned_density']:.2f}%" if r.get("learned_density") is not None else "–"
        lines.append(f"| {r['run']} | {r.get('variant', '')} | {100 * r['score']:.2f} | {evals} | {density} | "
                     f"{r.get('nnz') or 0:,} |")
    return "\n".join(lines) + "\n"


def _records(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def _replace(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{body}{end}{rest.split(end, 1)[1]}"


def write_section(readme: Path, name: str, results: Path, render_records) -> None:
    """Rewrite one generated section of `readme` from the records in `results`."""
    write_text(readme, _replace(readme.read_text(), name, render_records(_records(results))))


def write_table(results: Path, readme: Path, profile: str = "") -> None:
    """Rewrite the generated sections of benchmarks/README.md from every results file; `profile`
    names run_glue.py's sections of GLUE records other than the main table's."""
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    text = _replace(text, f"glue{profile}-table", render(_records(results)))
    text = _replace(text, f"goals{profile}-table", render_goals(_records(results), measured_only=bool(profile)))
    text = _replace(text, "cost-table", render_cost(_records(results.parent / "cost.jsonl")))
    text = _replace(text, "storage-table", render_storage(_records(results.parent / "storage.jsonl")))
    text = _replace(text, "study-table", render_study(_records(results.parent / "diff_study.jsonl")))
    write_text(readme, text)
