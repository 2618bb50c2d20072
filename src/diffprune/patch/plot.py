"""Where a task's patch lives: density per layer and per type of tensor, tasks side by side.

Layer and tensor type come from the parameter names alone (the first integer path component is
the layer; the rest of the name is the type), so any architecture plots without special cases.
The colour is the density of the patch's positions among a cell's entries, whatever their kind;
cells holding switched-off ("mask") or kept ("sparse") entries are marked, and each panel's
title counts the entries of each kind.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from diffprune.errors import DiffpruneError
from diffprune.patch.kinds import ADD, KINDS, MASK, SPARSE
from diffprune.patch.taskpatch import TaskPatch

_LAYER = re.compile(r"\.(\d+)\.")
# The mark a cell gets for the kinds other than "add", and what it says in the figure's note.
MARKS = {MASK: ("off", "entries switched off"), SPARSE: ("sp", "entries kept of a sparse tensor, the rest zero")}
TITLE_WORDS = {ADD: "added", MASK: "switched off", SPARSE: "kept (sparse)"}


def locate(name: str) -> tuple[str, str]:
    """('layer 3', 'attention.self.query.weight') or ('embeddings', 'word_embeddings.weight')."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1)):02d}", name[m.end():]
    parts = name.split(".")
    group = next((p for p in parts if "embed" in p), None)
    return ("embeddings", ".".join(parts[parts.index(group) + 1:]) or group) if group else ("other", name)


def panel_labels(files: list[str] | tuple[str, ...], patches: list[TaskPatch]) -> list[str]:
    """One distinct title per patch: task and method, or the file where those repeat (two seeds
    of one task), numbered where even the file repeats."""
    labels = [f"{p.meta.get('task')} ({p.meta.get('method')})" for p in patches]
    if len(set(labels)) < len(labels):
        labels = [str(f) for f in files]
    seen: dict[str, int] = defaultdict(int)
    unique = []
    for label in labels:
        seen[label] += 1
        unique.append(label if seen[label] == 1 else f"{label} [{seen[label]}]")
    return unique


def density_table(patch: TaskPatch, shapes: dict[str, tuple[int, ...]]) -> dict[tuple[str, str], float]:
    """(where, tensor type) -> density of the patch's positions among the entries of those base tensors."""
    nnz, numel = defaultdict(int), defaultdict(int)
    for name, shape in shapes.items():
        key = locate(name)
        numel[key] += int(np.prod(shape))
        if name in patch.diffs:
            nnz[key] += patch.diffs[name].nnz
    return {key: nnz[key] / numel[key] for key in numel}


def kind_marks(patch: TaskPatch, shapes: dict[str, tuple[int, ...]]) -> dict[tuple[str, str], str]:
    """(where, tensor type) -> the marks of the non-add kinds among those tensors ("off", "sp", "off+sp")."""
    kinds = defaultdict(set)
    for name in shapes:
        if name in patch.diffs and patch.diffs[name].kind in MARKS:
            kinds[locate(name)].add(patch.diffs[name].kind)
    return {key: "+".join(MARKS[k][0] for k in KINDS if k in found) for key, found in kinds.items()}


def panel_title(label: str, patch: TaskPatch) -> str:
    base_params = max(1, int(patch.meta.get("base_params") or 1))
    kinds_held = {d.kind for d in patch.diffs.values()} or {ADD}
    counts = ", ".join(f"{n:,} {TITLE_WORDS[k]}" for k, n in patch.nnz_by_kind.items() if k in kinds_held)
    return f"{label}\n{counts} ({100 * patch.nnz / base_params:.2f}%)"


def plot_path(output: str | Path) -> Path:
    """Where the plot goes: `output`, with .png added if it has no suffix; a suffix matplotlib
    cannot write is an error."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    from matplotlib.backend_bases import FigureCanvasBase

    output = Path(output)
    if not output.suffix:
        return output.with_suffix(".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if output.suffix[1:].lower() not in formats:
        raise DiffpruneError(f"cannot write a plot as '{output.suffix}'; use one of "
                             + ", ".join(f".{f}" for f in sorted(formats)))
    return output


def plot_patches(patches: dict[str, TaskPatch], shapes: dict[str, tuple[int, ...]], output: str | Path) -> Path:
    """One heatmap per patch (rows: types of tensor, columns: where), on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    tables = {label: density_table(p, shapes) for label, p in patches.items()}
    places = sorted({w for t in tables.values() for w, _ in t}, key=lambda w: (w != "embeddings", w == "other", w))
    types = sorted({k for t in tables.values() for _, k in t})
    grids = {label: np.array([[t.get((w, k), np.nan) for w in places] for k in types]) for label, t in tables.items()}
    positive = [g[g > 0] for g in grids.values() if np.any(g > 0)]
    low = min(float(v.min()) for v in positive) if positive else 1e-6
    high = max(float(v.max()) for v in positive) if positive else 1.0
    fig, axes = plt.subplots(1, len(grids), figsize=(1.2 + 0.55 * len(places) * len(grids) + 3, 0.32 * len(types) + 2),
                             squeeze=False, sharey=True)
    image = None
    used_marks = set()
    for ax, (label, grid) in zip(axes[0], grids.items()):
        shown = np.where(grid > 0, grid, np.nan)  # zero density is left blank, not the palest colour
        image = ax.imshow(shown, aspect="auto", cmap="viridis", norm=LogNorm(vmin=low, vmax=max(high, low * 1.01)))
        for (where, tensor_type), mark in kind_marks(patches[label], shapes).items():
            ax.text(places.index(where), types.index(tensor_type), mark, ha="center", va="center", fontsize=6,
                    color="red")
            used_marks.update(mark.split("+"))
        ax.set_title(panel_title(label, patches[label]), fontsize=9)
        ax.set_xticks(range(len(places)), [p.replace("layer ", "L") for p in places], rotation=90, fontsize=7)
        ax.set_yticks(range(len(types)), types, fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), label="density of the patch's entries (log scale)", shrink=0.9)
    if used_marks:
        note = "; ".join(f"{mark}: {words}" for mark, words in MARKS.values() if mark in used_marks)
        fig.text(0.01, -0.02, f"{note}; unmarked: added diffs", fontsize=7, ha="left", va="top")
    output = plot_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return output
