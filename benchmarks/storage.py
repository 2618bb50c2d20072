"""What a patch costs to store and to switch, against the information bound and LoRA's file.

For each trained fp32 patch given (default: every benchmarks/runs/*/patch.safetensors of a diff
method), write fp32 / fp16 / bf16 copies, compare each file's bytes with the information bound
(`bound_bytes`: log2 C(n, k) bits for each kind's positions + 16 bits per stored value) and
score each copy on the dev set, so that "fp16 loses nothing" is measured, not assumed. Then time
apply + revert of the patch on the packaged model (median of --repeats) and check that revert
restores the base bit for bit.
Appends {"kind": "storage", ...} records to results/storage.jsonl.

    python benchmarks/storage.py --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import diffprune
from diffprune.api import evaluate_patch
from diffprune.patch import ADD, KINDS, MASK, TaskPatch, information_bound_bits
from diffprune.patch.ops import base_for

HERE = Path(__file__).resolve().parent


def bound_bytes(patch: TaskPatch, value_bits: int = 16) -> float:
    """The fewest bytes any code can store the patch's changes in (the head and header aside),
    summed over the kinds: log2 C(n, k) bits for the k positions of a kind, plus `value_bits`
    per value for "add" and "sparse" ("mask" stores none).

    n is where the kind's positions could be: for "add" anywhere in the base (`base_params`, as
    the records before the kinds were measured); for "mask" and "sparse" the entries of the
    tensors of that kind, since a method masks or prunes a chosen scope of tensors (naming them
    is a few table bytes), and the positions are a choice among those tensors' entries only."""
    bits = 0.0
    for kind in KINDS:
        tensors = [d for d in patch.diffs.values() if d.kind == kind]
        k = sum(d.nnz for d in tensors)
        if not tensors:
            continue
        n = int(patch.meta["base_params"]) if kind == ADD else sum(d.numel for d in tensors)
        bits += information_bound_bits(n, k) + (value_bits * k if kind != MASK else 0)
    return bits / 8


def time_apply_revert(patch: TaskPatch, repeats: int) -> tuple[float, float, bool, int]:
    """Median apply and revert ms, whether revert is bit-exact, and the bytes of a full fp32
    copy of the task model (base and head), what the patch stands in for."""
    base = base_for(patch)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    apply_t, revert_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        applied = patch.apply(base)
        t1 = time.perf_counter()
        applied.revert()
        t2 = time.perf_counter()
        apply_t.append(t1 - t0)
        revert_t.append(t2 - t1)
    exact = all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    copy_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
    return statistics.median(apply_t) * 1e3, statistics.median(revert_t) * 1e3, exact, copy_bytes


def measure(path: Path, data_dir: str | None, repeats: int) -> dict:
    patch = TaskPatch.load(path)
    sizes, scores = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16", "bfloat16"):
            copy = Path(tmp) / f"{dtype}.safetensors"
            sizes[dtype] = patch.save(copy, value_dtype=dtype)
            scores[dtype] = evaluate_patch(copy, data_dir=data_dir)["score"]
    apply_ms, revert_ms, exact, copy_bytes = time_apply_revert(patch, repeats)
    bound = bound_bytes(patch)
    lora = _lora_adapter_bytes(patch.meta.get("task"))
    return {
        "kind": "storage", "patch": path.parent.name, "task": patch.meta.get("task"),
        "method": patch.meta.get("method"), "nnz": patch.nnz, "nnz_by_kind": patch.nnz_by_kind,
        "base_params": patch.meta["base_params"],
        "bound_bytes": round(bound), "bytes": sizes, "bytes_over_bound_fp16": round(sizes["float16"] / bound, 4),
        "dev_score": scores, "fp16_minus_fp32": scores["float16"] - scores["float32"],
        "apply_ms": round(apply_ms, 3), "revert_ms": round(revert_ms, 3),
        "apply_revert_ms": round(apply_ms + revert_ms, 3), "revert_bit_exact": exact,
        "lora_r8_adapter_bytes": lora, "full_copy_bytes": copy_bytes, "library_version": diffprune.__version__,
        "options": {"repeats": repeats},
    }


def _lora_adapter_bytes(task: str | None) -> int | None:
    """Size of the LoRA r8 adapter file trained on the same task (seed 1) in the same harness."""
    adapter = HERE / "runs" / f"{task}-lora-s1" / "adapter" / "adapter_model.safetensors"
    return adapter.stat().st_size if adapter.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("patches", nargs="*", type=Path)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    # budgeted runs (`-b0.005`), not BitFit's patch
    patches = args.patches or sorted(p for p in (HERE / "runs").glob("*-b0.*/patch.safetensors"))
    out = HERE / "results" / "storage.jsonl"
    for path in patches:
        record = measure(path, args.data_dir, args.repeats)
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record))


if __name__ == "__main__":
    main()
