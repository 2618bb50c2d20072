"""The sparse-speed table of benchmarks/README.md, generated from results/sparse_speed.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from diffprune.io import write_text

NAMES = {"eager": "torch eager", "compile": "torch.compile", "csr": "torch CSR", "onnxruntime": "ONNX Runtime",
         "diffprune": "diffprune sparse"}


def _latest(records: list[dict]) -> list[dict]:
    """The last record of each model x sparsity x shape x threads (a rerun replaces a row)."""
    rows: dict[tuple, dict] = {}
    for r in records:
        rows[(r["model"], r["sparsity"], r["batch_size"], r["length"], r["threads"])] = r
    return list(rows.values())


def render(records: list[dict]) -> str:
    rows = _latest([r for r in records if r.get("kind") == "sparse_speed"])
    if not rows:
        return "No sparse-speed records yet.\n"
    engines = [e for e in NAMES if any(e in r["ms"] for r in rows)]
    lines = [
        "Median ms per call (speedup against torch eager in brackets); `diffprune x compile` is its speedup "
        "against torch.compile; diff: the largest output difference of diffprune's sparse model to eager; "
        "weights: the bytes diffprune's Linear weights take against their dense fp32 bytes; load: the 1-minute "
        "load average when the row started (2 cores: above about 0.5, other work shared them, and every "
        "engine ran slower).",
        "",
        "| model | sparsity | batch x length | threads | " + " | ".join(NAMES[e] for e in engines)
        + " | diffprune x compile | diff | weights | sparse layers | load |",
        "|---" * (len(engines) + 9) + "|",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], r["sparsity"], r["threads"], r["batch_size"], r["length"])):
        ms = r["ms"]
        cells = []
        for e in engines:
            if e not in ms:
                cells.append("")
            else:
                cells.append(f"{ms[e]:.2f}" + (f" ({ms['eager'] / ms[e]:.2f}x)" if e != "eager" and "eager" in ms else ""))
        sparse = ms.get("diffprune")
        vs_compile = f"{ms['compile'] / sparse:.2f}x" if sparse and "compile" in ms else ""
        diff = r["max_abs_diff"].get("diffprune")
        weights = r["weight_bytes"].get("diffprune")
        ratio = f"{weights / r['dense_fp32_weight_bytes']:.3f}x" if weights else ""
        layers = f"{r['sparse_layers']}/{r['pruned_layers']}" if r.get("sparse_layers") is not None else ""
        diff_text = f"{diff:.1e}" if diff is not None else ""
        lines.append(f"| {r['model']} | {r['sparsity']:.0%} | {r['batch_size']} x {r['length']} | {r['threads']} | "
                     + " | ".join(cells) + f" | {vs_compile} | {diff_text} | {ratio} | {layers} | "
                     f"{r['load_avg_start'][0]:.2f} |")
    return "\n".join(lines) + "\n"


def write_sparse_table(results: Path, readme: Path) -> None:
    from table import _replace

    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    write_text(readme, _replace(text, "sparse-speed-table", render(records)))
