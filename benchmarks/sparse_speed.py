"""Sparse inference on the CPU against the ways people run a pruned encoder today.

Models: the packaged MiniLM with its encoder Linear weights pruned per matrix by magnitude at
each --sparsities; a BERT-base-shaped model (hidden 768, 12 layers) built from a config at each
--bert-sparsities (speed does not depend on trained values); and --patch files (a pattern a
diffprune method learned). For each batch size x length x thread count, in one process and
alternating in blocks of consecutive calls (as a user running one of them sees it; see
diffprune.sparse.speed.time_in_blocks): dense torch (eager), dense torch.compile, torch CSR
weights, ONNX Runtime (dense) and diffprune's sparse model (`sparsify`); the median of --repeats
calls after warm-up, the largest output difference to dense eager, and the bytes the Linear weights take.
Appends {"kind": "sparse_speed", ...} records to results/sparse_speed.jsonl and rewrites the
sparse-speed table of benchmarks/README.md.

    python benchmarks/sparse_speed.py                       # the goal: 1 x 128 tokens, 2 threads
    python benchmarks/sparse_speed.py --batch-sizes 1,8 --lengths 32,128 --threads 1,2   # the grid
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import diffprune
from diffprune.base import load_base
from diffprune.pruning.targets import encoder_linear_weights
from diffprune.pruning.topk import keep_masks, kept_count
from diffprune.sparse import SparseLinear, sparsify
from diffprune.sparse.fuse import FusedEncoderLayer
from diffprune.sparse.speed import linear_weight_bytes
from diffprune.sparse.timing import BLOCK, SETTLE, time_in_blocks

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "sparse_speed.jsonl"
ENGINES = ("eager", "compile", "csr", "onnxruntime", "diffprune")


def prune_by_magnitude(model: nn.Module, sparsity: float) -> None:
    """Zero the smallest-magnitude entries of each encoder Linear weight (per matrix), in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in encoder_linear_weights(model):
            w = params[name]
            keep = keep_masks([w.abs()], kept_count(sparsity, w.numel()), "global")[0]
            w.mul_(keep)


def bert_base() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    return BertForSequenceClassification(config).eval()


def models(args) -> list[tuple[str, float, nn.Module]]:
    """(name, sparsity of the encoder Linears, model) for every model asked for, built lazily."""
    for s in args.sparsities:
        model = load_base().model.eval()
        prune_by_magnitude(model, s)
        yield "all-MiniLM-L6-v2 (magnitude)", s, model
    for s in args.bert_sparsities:
        model = bert_base()
        prune_by_magnitude(model, s)
        yield "BERT-base shape (magnitude)", s, model
    for path in args.patch:
        from diffprune.patch import TaskPatch
        from diffprune.patch.ops import base_for

        patch = TaskPatch.load(path)
        base = base_for(patch)
        patch.apply(base)
        model = base.model.eval()
        yield f"MiniLM, {patch.meta.get('method')} on {patch.meta.get('task')} (learned)", encoder_sparsity(model), model


def encoder_sparsity(model: nn.Module) -> float:
    params = dict(model.named_parameters())
    weights = [params[n] for n in encoder_linear_weights(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


class CsrLinear(nn.Module):
    """Stock torch: the weight as a torch CSR tensor, y^T = W x^T (torch.sparse.mm) + b."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = linear.bias.detach() if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sparse.mm(self.weight, x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], -1)
        return y + self.bias if self.bias is not None else y

    def weight_bytes(self) -> int:
        w = self.weight
        return sum(t.numel() * t.element_size() for t in (w.crow_indices(), w.col_indices(), w.values()))


def csr_model(model: nn.Module) -> tuple[nn.Module, int]:
    out = copy.deepcopy(model)
    stored = 0
    for name in [n for n, m in out.named_modules() if type(m) is nn.Linear]:
        linear = out.get_submodule(name)
        if (linear.weight == 0).any():
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, CsrLinear(linear))
    for m in out.modules():
        stored += m.weight_bytes() if isinstance(m, CsrLinear) else (
            m.weight.numel() * 4 if type(m) is nn.Linear else 0)
    return out, stored


class OnnxRunner:
    """ONNX Runtime (CPU, dense): the model exported once, a session per thread count."""

    def __init__(self, model: nn.Module, folder: Path) -> None:
        ids = torch.ones(1, 8, dtype=torch.long)
        self.path = folder / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (ids, torch.ones_like(ids)), str(self.path), dynamo=False,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_axes={k: {0: "batch", 1: "length"} for k in ("input_ids", "attention_mask")},
                              opset_version=17)
        self.sessions: dict[int, object] = {}

    def session(self, threads: int):
        import onnxruntime as ort

        if threads not in self.sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            # Its threads would otherwise spin after each call and take the cores from the
            # engine timed next (the engines alternate).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.sessions[threads] = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        return self.sessions[threads]

    def __call__(self, input_ids, attention_mask, threads: int) -> torch.Tensor:
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return torch.from_numpy(self.session(threads).run(None, feeds)[0])


def fixed_engines(model: nn.Module, wanted: list[str], folder: Path) -> dict:
    """The engines built once per model: callables taking (input_ids, attention_mask, threads)
    and returning logits, with the bytes their Linear weights take."""
    dense_bytes = linear_weight_bytes(model)["stored"]
    found: dict[str, tuple] = {}
    if "eager" in wanted:
        found["eager"] = (_logits(model), dense_bytes)
    if "compile" in wanted:
        found["compile"] = (_logits(torch.compile(model)), dense_bytes)
    if "csr" in wanted:
        csr, stored = csr_model(model)
        found["csr"] = (_logits(csr), stored)
    if "onnxruntime" in wanted:
        found["onnxruntime"] = (OnnxRunner(model, folder), dense_bytes)
    return found


def _logits(model: nn.Module):
    return lambda ids, mask, threads: model(input_ids=ids, attention_mask=mask).logits


def time_engines(engines: dict, inputs: tuple, threads: int, repeats: int, warmup_rounds: int) -> dict[str, list[float]]:
    """Each engine's call times (ms), in alternating blocks of consecutive calls (time_in_blocks)."""
    return time_in_blocks({name: (lambda run=run: run(*inputs, threads)) for name, (run, _) in engines.items()},
                          repeats, warmup_rounds)


def kernel_threads(model: nn.Module) -> int | str:
    """The threads the converted layers' kernels take ("torch": as many as torch uses, as
    fused layers do)."""
    if any(isinstance(m, FusedEncoderLayer) for m in model.modules()):
        return "torch"
    found = {m.threads for m in model.modules() if isinstance(m, SparseLinear)}
    return "torch" if found in ({None}, set()) else max(t or 0 for t in found)


def commit() -> str | None:
    """The checkout's commit (records of one library version can come from different kernels)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def measure(name: str, sparsity: float, model: nn.Module, args, folder: Path) -> list[dict]:
    records = []
    fixed = fixed_engines(model, args.engines, folder)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch_sizes:
            for length in args.lengths:
                load = os.getloadavg()
                ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
                inputs = (ids, torch.ones_like(ids))
                engines, report = dict(fixed), None
                if "diffprune" in args.engines:  # converted for this shape and thread count
                    sparse = copy.deepcopy(model)
                    report = sparsify(sparse, batch_size=batch, length=length)
                    engines["diffprune"] = (_logits(sparse), linear_weight_bytes(sparse)["stored"])
                with torch.no_grad():
                    ref = _logits(model)(*inputs, threads)
                    diffs = {e: float((run(*inputs, threads) - ref).abs().max()) for e, (run, _) in engines.items()}
                times = time_engines(engines, inputs, threads, args.repeats, args.warmup_rounds)
                records.append({
                    "kind": "sparse_speed", "version": diffprune.__version__, "model": name, "sparsity": sparsity,
                    "batch_size": batch, "length": length, "threads": threads, "repeats": args.repeats,
                    "warmup_rounds": args.warmup_rounds, "load_avg_start": load, "load_avg_end": os.getloadavg(),
                    "ms": {e: statistics.median(t) for e, t in times.items()},
                    "ms_min": {e: min(t) for e, t in times.items()},
                    "max_abs_diff": diffs,
                    "weight_bytes": {e: b for e, (_, b) in engines.items()},
                    "dense_fp32_weight_bytes": linear_weight_bytes(model)["dense_fp32"],
                    "sparse_layers": len(report.sparse_layers) if report else None,
                    "fused_layers": len(report.fused_layers) if report else None,
                    "pruned_layers": sum(layer.density < 1 for layer in report.layers) if report else None,
                    "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "options": {"engines": args.engines, "onnxruntime_spinning": False, "block": BLOCK,
                                "settle": SETTLE,
                                "diffprune_calibration": f"{batch}x{length}",
                                "diffprune_kernel_threads": kernel_threads(sparse) if report else None},
                    "commit": commit(),
                })
                print(_line(records[-1]), flush=True)
    return records


def _line(r: dict) -> str:
    ms = r["ms"]
    base = ms.get("eager")
    parts = [f"{e} {v:.2f} ms" + (f" ({base / v:.2f}x)" if base and e != "eager" else "") for e, v in ms.items()]
    return (f"{r['model']} {r['sparsity']:.0%} b{r['batch_size']}x{r['length']} t{r['threads']}: " + ", ".join(parts)
            + f"  load {r['load_avg_start'][0]:.2f}")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=_floats, default=_floats("0,0.5,0.8,0.9,0.95,0.98"))
    parser.add_argument("--bert-sparsities", type=_floats, default=_floats("0.8,0.95"))
    parser.add_argument("--patch", action="append", default=[], help="A patch file of a learned pattern (repeatable).")
    parser.add_argument("--batch-sizes", type=_ints, default=[1])
    parser.add_argument("--lengths", type=_ints, default=[128])
    parser.add_argument("--threads", type=_ints, default=[2])
    parser.add_argument("--engines", type=lambda t: t.split(","), default=list(ENGINES))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup-rounds", type=int, default=1, help="Rounds of blocks left out first.")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-table", action="store_true", help="Do not rewrite benchmarks/README.md.")
    args = parser.parse_args()
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engine {sorted(unknown)[0]}; choose from {', '.join(ENGINES)}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, sparsity, model in models(args):
            for record in measure(name, sparsity, model, args, Path(tmp)):
                with args.results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    if not args.no_table:
        from sparse_table import write_sparse_table

        write_sparse_table(args.results, HERE / "README.md")


if __name__ == "__main__":
    main()
