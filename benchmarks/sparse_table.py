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
        "weights: the bytes diffprune's Linear weights take against their dense fp32 bytes; fused: encoder layers "
        "run as one fused call (empty: rows from before fusion); load: the 1-minute "
        "load average when the row started (2 cores: above about 0.5, other work shared them, and every "
        "engine ran slower).",
        "",
        "| model | sparsity | batch x length | threads | " + " | ".join(NAMES[e] for e in engines)
        + " | diffprune x compile | diff | weights | sparse layers | fused | load |",
        "|---" * (len(engines) + 10) + "|",
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
        fused = str(r["fused_layers"]) if r.get("fused_layers") is not None else ""
        lines.append(f"| {r['model']} | {r['sparsity']:.0%} | {r['batch_size']} x {r['length']} | {r['threads']} | "
                     + " | ".join(cells) + f" | {vs_compile} | {diff_text} | {ratio} | {layers} | {fused} | "
                     f"{r['load_avg_start'][0]:.2f} |")
    return "\n".join(lines) + "\n"


INTRO = """
## Sparse inference on the CPU (`sparse_speed.py`)

diffprune's sparse model (`diffprune.sparse.sparsify`: each pruned Linear as compressed rows run
by a numba kernel, where that is measured faster than dense) against dense torch eager, torch
with `torch.compile`, torch's own CSR weights (`torch.sparse.mm` on the transposed input) and
ONNX Runtime (dense, its threads not spinning so that they leave the cores to the engine timed
next). All in one process, alternating in blocks of calls, on the same tokens. The packaged MiniLM is
pruned per matrix by magnitude (speed does not depend on which weights survive, only on how
many per row); the BERT-base-shaped model is built from a config. Rerun with
`python benchmarks/sparse_speed.py` (see its --help for the grid).
"""

GOALS = ((0.95, 3.5), (0.8, 1.8), (0.5, 1.0))


def render_goals(records: list[dict]) -> str:
    """The issue's goal rows: packaged model, batch 1 x 128 tokens, 2 threads (and 1 thread)."""
    rows = {(r["sparsity"], r["threads"]): r for r in _latest(records)
            if r["model"].startswith("all-MiniLM") and (r["batch_size"], r["length"]) == (1, 128)}
    lines = ["Goals (packaged model, batch 1 x 128 tokens): speedup of diffprune's sparse model against torch "
             "eager (and against torch.compile); the weights' bytes against dense fp32 at 95% (goal ≤ 0.15x).", "",
             "| sparsity | goal | threads | vs eager | vs torch.compile | vs eager, fastest calls | met | load |",
             "|---|---|---|---|---|---|---|---|"]
    for sparsity, goal in GOALS:
        for threads in (2, 1):
            r = rows.get((sparsity, threads))
            if r is None or "diffprune" not in r["ms"]:
                continue
            ms = r["ms"]
            speedup = ms["eager"] / ms["diffprune"]
            vs_compile = f"{ms['compile'] / ms['diffprune']:.2f}x" if "compile" in ms else ""
            fastest = r.get("ms_min", {})
            vs_fastest = f"{fastest['eager'] / fastest['diffprune']:.2f}x" if "diffprune" in fastest else ""
            lines.append(f"| {sparsity:.0%} | ≥ {goal}x | {threads} | {speedup:.2f}x | {vs_compile} | {vs_fastest} | "
                         f"{'yes' if speedup >= goal else 'no'} | {r['load_avg_start'][0]:.2f} |")
    r95 = rows.get((0.95, 2)) or rows.get((0.95, 1))
    if r95 and "diffprune" in r95["weight_bytes"]:
        ratio = r95["weight_bytes"]["diffprune"] / r95["dense_fp32_weight_bytes"]
        lines += ["", f"Weights at 95%: {ratio:.3f}x their dense fp32 bytes (goal ≤ 0.15x)."]
    return "\n".join(lines) + "\n\n"


READING = """\
**How to read these rows.** The load column is the 1-minute load average when a row started;
a row measured on quiet cores shows about its own thread count there (the newest goal rows at 2
threads were: the GLUE grid running beside them was paused with SIGSTOP, and the load average
trails by a minute). A row with a higher load was measured while other work shared the two
cores, which slows every engine, torch's 2-thread engines most (their OpenMP threads spin-wait
against the other work) and ONNX Runtime's least (its threads sleep); "fastest calls" divides
the fastest calls, which load disturbs least.

The kernel reads and writes the activations as torch holds them: tiles of 16 or 32 tokens are
transposed in cache by vector shuffles and each output row's sums stay in vector registers over
its nonzeros (`sparse/simd.py`). Since the second session of 2026-12-07 (rows with a "fused"
count), a BERT-style encoder layer whose six Linear layers all run sparse is one numba call
(`sparse/encoder_kernel.py`, `sparse/fuse.py`): attention, GELU, LayerNorm and the residual adds
in vector code, every step on all threads, no torch op inside. Before, the non-Linear work took
about 4 ms of the 10 ms forward pass at 95%, and each kernel ran on one thread, because torch's
OpenMP threads, spinning after their own ops, took the second core's gain away; a fused model
runs torch's own few ops (embeddings, pooler, head) on one thread for that reason. sparsify
keeps the fused layers where the whole model is measured faster with them. The engines are
timed in blocks of 5 consecutive calls, the first 2 of each block left out: a call right after
another engine pays for that engine's spinning threads (a fused 95% MiniLM after dense torch:
8.8 instead of 6.5 ms), which a user running one model never sees. Older rows alternated call by
call.

"""


def section(records: list[dict]) -> str:
    return READING + render_goals(records) + render(records)


def with_section(text: str, records: list[dict]) -> str:
    """`text` (a benchmarks README) with the generated sparse-speed section, its heading and
    introduction added at the end the first time."""
    from table import _replace

    if "<!-- sparse-speed-table:begin -->" not in text:
        text = text.rstrip("\n") + "\n" + INTRO
    return _replace(text, "sparse-speed-table", section(records))


def read_records(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []


def write_sparse_table(results: Path, readme: Path) -> None:
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    write_text(readme, with_section(text, read_records(results)))
