"""Patch operations that need a base model: load the right base, apply, export."""

from __future__ import annotations

from pathlib import Path

from diffprune.base import DEFAULT_MODEL_NAME, BaseModel, load_base
from diffprune.errors import DiffpruneError
from diffprune.heads import MODEL_HEAD
from diffprune.patch.taskpatch import TaskPatch, export_model


def base_for(patch: TaskPatch, model: str | None = None) -> BaseModel:
    """The base a patch names (the packaged MiniLM for the default), or `model` if given.
    Either way, applying checks the fingerprint, so a wrong base is refused."""
    name = model or patch.meta.get("base")
    if model is None and name and Path(name).is_absolute() and not Path(name).is_dir():
        raise DiffpruneError(f"the patch was made on the base model in '{name}', which is not here; "
                             "pass --base MODEL (its fingerprint is checked)")
    labels = patch.meta.get("labels")
    return load_base(
        None if name == DEFAULT_MODEL_NAME else name,
        int(patch.meta.get("num_labels") or 2),
        labels=tuple(labels) if labels else None,
        regression=patch.meta.get("problem_type") == "regression",
        head=patch.meta.get("head") or MODEL_HEAD,  # patches made before heads were a choice: the model's
    )


def export(patch_path: str | Path, output: str | Path, model: str | None = None) -> Path:
    """Write base + patch as a plain transformers model folder."""
    patch = TaskPatch.load(patch_path)
    return export_model(patch, base_for(patch, model), output)


def sum_patches(a: TaskPatch, b: TaskPatch) -> tuple[TaskPatch, dict[str, int]]:
    """a + b for two "add" patches of one base (a domain patch plus a task patch, say): every
    changed entry of either, overlapping ones summed (in float32), sums of exactly zero left out.
    The head and the task's meta are b's. Returns the sum and {tensor: overlapping positions}."""
    import torch

    from diffprune.patch.kinds import ADD, SparseDiff

    for label, p in (("the first", a), ("the second", b)):
        kinds = sorted({d.kind for d in p.diffs.values()} - {ADD})
        if kinds:
            raise DiffpruneError(f"patch add sums 'add' patches, and {label} holds '{kinds[0]}' changes")
    if a.meta["fingerprint"] != b.meta["fingerprint"]:
        raise DiffpruneError(f"the patches are for different bases: {a.meta['fingerprint']} and {b.meta['fingerprint']}")
    diffs, overlaps = {}, {}
    for name in sorted(set(a.diffs) | set(b.diffs)):
        da, db = a.diffs.get(name), b.diffs.get(name)
        if da is not None and db is not None and da.shape != db.shape:
            raise DiffpruneError(f"'{name}' has shape {da.shape} in the first patch and {db.shape} in the second")
        parts = [d for d in (da, db) if d is not None]
        positions, inverse = torch.unique(torch.cat([d.positions for d in parts]), return_inverse=True)
        values = torch.zeros(positions.numel()).index_add_(0, inverse, torch.cat([d.values for d in parts]))
        if len(parts) == 2:
            overlaps[name] = da.nnz + db.nnz - positions.numel()
        kept = values != 0
        diffs[name] = SparseDiff(parts[0].shape, positions[kept], values[kept], ADD)
    meta = {**b.meta, "metrics": {}, "sum_of": [_origin(a), _origin(b)]}
    meta.pop("library_version", None)
    return TaskPatch(diffs, b.head, meta), {n: k for n, k in overlaps.items() if k}


def _origin(p: TaskPatch) -> dict:
    return {"file": p._path.name if p._path else None, "task": p.meta.get("task"), "method": p.meta.get("method"),
            "nnz": p.nnz}


def add_files(first: str | Path, second: str | Path, output: str | Path, value_dtype: str = "auto",
              overwrite: bool = False) -> dict:
    """`diffprune patch add`: write first + second to output; what it did, for the report."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise DiffpruneError(f"{output} exists (pass --overwrite to replace it)")
    a, b = TaskPatch.load(first), TaskPatch.load(second)
    if output.resolve() in (Path(first).resolve(), Path(second).resolve()):
        raise DiffpruneError("the output would overwrite one of the patches being added")
    total, overlaps = sum_patches(a, b)
    if value_dtype == "auto":  # a sum of two rounded values needs float32 to stay exact
        same = a._value_dtype == b._value_dtype
        value_dtype = a._value_dtype if same and not overlaps and a._value_dtype else "float32"
    size = total.save(output, value_dtype)
    return {"output": str(output), "bytes": size, "nnz": total.nnz, "first_nnz": a.nnz, "second_nnz": b.nnz,
            "overlapping": sum(overlaps.values()), "overlaps": overlaps, "value_dtype": value_dtype}
