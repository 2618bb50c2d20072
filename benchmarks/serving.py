"""Serving many tasks on one base: switching, mixed-task batches, memory, and an HTTP load test.

On the packaged all-MiniLM-L6-v2, with random 0.5% "add" patches (serving cost depends on how
many entries a patch changes and where, not on what was learned: diffprune.serving.synthetic):

* apply_revert: apply + revert of one patch by switching (median of --repeats): as the task bank
  holds it (the compact form of its file: fp16 values), and as a TaskPatch in memory (fp32);
* mixed: one forward of a batch of R rows over T tasks (--mixed-shapes, 64 tokens a row) with
  every row's own delta and head, against the bare base on the same batch and PEFT's mixed LoRA
  batches (r 8 on query and value, `adapter_names=`), medians, timed in blocks of calls as a server
  running one of them sees it (diffprune.sparse.timing: call by call, each paid for the threads
  the one before left spinning; records with "timing": "blocks" in their options);
* sparse_task: a task whose patch is a pruned model (every encoder Linear at --sparsity, the
  'sparse' kind of pruning at distilling) run by switching onto the dense base and on its own
  sparse model (`diffprune serve --sparse`), a batch of --sparse-rows x 64 tokens, in blocks;
  the bytes the sparse model holds beside its patch file;
* memory: the bytes a loaded task's tensors hold in the bank against its patch file (fp16
  values), counted tensor by tensor (a resident-memory delta would hide in memory the allocator
  kept from building the patches);
* load: `diffprune serve` on 127.0.0.1 in its own process, --clients concurrent clients for
  --load-seconds, each request one text for one of 16 tasks; errors, throughput, p50 / p99
  latency; the same load on a server of the bare base (16 head-only patches).

Records are appended to results/serving.jsonl, one per measure, each with the options used and
the load average at its start (the machine may be shared: `contended` marks a load average over
0.5). A measure already recorded with the same options is skipped (resumable); --force redoes it.
The table in benchmarks/README.md is generated from the records (--table-only).

    python benchmarks/serving.py                      # everything (the load test: 2 x 60 s)
    python benchmarks/serving.py --only mixed --mixed-shapes 16x16 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import diffprune
from diffprune.sparse.timing import time_in_blocks

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "serving.jsonl"
README = HERE / "README.md"
BEGIN, END = "<!-- serving-table:begin -->", "<!-- serving-table:end -->"
MEASURES = ("apply_revert", "mixed", "sparse_task", "memory", "load")
SENTENCES = ["the movie was a delight from start to finish and the cast was wonderful throughout",
             "markets fell sharply on tuesday after the central bank raised interest rates again",
             "a man is playing a guitar on a street corner while people walk past him quietly",
             "the committee will meet next week to discuss the new budget and the hiring plan"]


def record(measure: str, options: dict, figures: dict) -> dict:
    load = os.getloadavg()
    return {"kind": "serving", "measure": measure, "diffprune_version": diffprune.__version__,
            "options": options, "loadavg": [round(x, 2) for x in load], **figures,
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} torch threads",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def done_before(measure: str, options: dict) -> bool:
    if not RESULTS.exists():
        return False
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return any(r["measure"] == measure and r["options"] == options for r in rows)


def append(rec: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


def median_ms(times: list[float]) -> float:
    return round(1e3 * statistics.median(times), 4)


# -- measures --------------------------------------------------------------------------------------
def apply_revert(base, density: float, repeats: int) -> dict:
    """A patch as a server switches it (saved with fp16 values, loaded by a TaskBank: its compact
    form) and the same patch as a TaskPatch in memory (fp32 values), timed alternately."""
    from diffprune.patch.apply import apply_patch
    from diffprune.serving.synthetic import random_patch

    patch = random_patch(base, density, 2)
    with tempfile.TemporaryDirectory() as folder:
        patch.save(Path(folder) / "t.safetensors")
        from diffprune.serving import TaskBank

        served = TaskBank(base, folder).get("t").patch
    runs = {"served": lambda: apply_patch(served, base, head=False).revert(),
            "taskpatch": lambda: apply_patch(patch, base, head=False).revert()}
    times = {k: [] for k in runs}
    for _ in range(20):
        for fn in runs.values():
            fn()
    for _ in range(repeats):
        for k, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {"nnz": patch.nnz, "apply_revert_ms": median_ms(times["served"]),
            "p90_ms": round(1e3 * sorted(times["served"])[int(0.9 * repeats)], 4),
            "taskpatch_apply_revert_ms": median_ms(times["taskpatch"]), "goal_ms": 1.0}


def batch_of(base, rows: int, tokens: int = 64) -> dict:
    texts = [" ".join(SENTENCES[(i + j) % 4] for j in range(4)) for i in range(rows)]
    return dict(base.tokenizer(texts, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt"))


def lora_model(tasks: int):
    from peft import LoraConfig, get_peft_model

    from diffprune.base import load_base

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS",
                        init_lora_weights=False)  # random B: the adapters really compute
    model = get_peft_model(load_base(None, 2).model, config, adapter_name="t0")
    for t in range(1, tasks):
        model.add_adapter(f"t{t}", config)
    return model.eval()


def served_tasks(base, folder: Path, tasks: int, density: float, seed: int = 0) -> list:
    """`tasks` random patches saved (fp16 values) and loaded by a TaskBank, as a server holds them."""
    from diffprune.serving import TaskBank
    from diffprune.serving.synthetic import random_patch

    for t in range(tasks):
        random_patch(base, density, 2 + t % 2, seed=seed + t).save(folder / f"t{t:03d}.safetensors")
    bank = TaskBank(base, folder, memory_bytes=2**40)
    return [bank.get(name) for name in bank.names()]


def mixed(base, tasks: int, rows: int, density: float, repeats: int) -> dict:
    from diffprune.serving.heads import forward_with_heads
    from diffprune.serving.mixed import MixedBatch

    with tempfile.TemporaryDirectory() as folder:
        loaded = served_tasks(base, Path(folder), tasks, density)
    encoded = batch_of(base, rows)
    row_slots = torch.arange(rows) % tasks
    heads, kinds = [t.head for t in loaded], [t.head_kind for t in loaded]
    peft = lora_model(tasks)
    names = [f"t{int(s)}" for s in row_slots]

    def ours():
        with MixedBatch(base.model, [t.diffs for t in loaded], row_slots).installed():
            return forward_with_heads(base, heads, kinds, row_slots, encoded)

    runs = {"bare": lambda: base.model(**encoded).logits, "diffprune": ours,
            "peft_lora": lambda: peft(**encoded, adapter_names=names).logits}
    ms = {k: round(statistics.median(v), 4) for k, v in time_in_blocks(runs, repeats).items()}
    return {"tasks": tasks, "rows": rows, "tokens": 64, "nnz_per_task": loaded[0].diffs.nnz,
            **{f"{k}_ms": v for k, v in ms.items()},
            "diffprune_vs_bare": round(ms["bare"] / ms["diffprune"], 4),
            "peft_lora_vs_bare": round(ms["bare"] / ms["peft_lora"], 4), "goal_vs_bare": 0.95}


def sparse_task(base, sparsity: float, rows: int, repeats: int) -> dict:
    """A task whose patch is a pruned model (every encoder Linear at `sparsity`, per matrix, random
    positions: the kernel's speed depends on the count) run by switching onto the dense base and
    on its own sparse model (TaskBank(sparse_runtime=True)), one batch of `rows` x 64 tokens."""
    from diffprune.patch.apply import apply_patch
    from diffprune.pruning.targets import encoder_linear_weights
    from diffprune.serving import TaskBank
    from diffprune.serving.heads import forward_with_heads
    from diffprune.serving.synthetic import random_patch

    weights = encoder_linear_weights(base.model)  # what the pruning methods prune
    with tempfile.TemporaryDirectory() as folder:
        random_patch(base, 1 - sparsity, 2, kind="sparse", tensors=weights).save(Path(folder) / "t.safetensors")
        file_bytes = (Path(folder) / "t.safetensors").stat().st_size
        bank = TaskBank(base, folder, sparse_runtime=True)
        task = bank.get("t")
    loaded, patch = bank.task_bytes(task), task.patch  # (the task drops its patch once its sparse model is made)
    start = time.perf_counter()
    sparse = task.sparse_model(base)
    build = time.perf_counter() - start
    encoded, slots = batch_of(base, rows), torch.zeros(rows, dtype=torch.int64)

    def switched():
        with apply_patch(patch, base, head=False):
            return forward_with_heads(base, [task.head], [task.head_kind], slots, encoded)

    runs = {"switching": switched, "sparse": lambda: forward_with_heads(sparse, [task.head], [task.head_kind],
                                                                        slots, encoded)}
    with torch.no_grad():
        gap = float((runs["switching"]() - runs["sparse"]()).abs().max())
    ms = {k: round(statistics.median(v), 4) for k, v in time_in_blocks(runs, repeats).items()}
    return {"sparsity": sparsity, "rows": rows, "tokens": 64, "switching_ms": ms["switching"],
            "sparse_ms": ms["sparse"], "speedup": round(ms["switching"] / ms["sparse"], 3),
            "max_abs_logit_gap": gap, "build_s": round(build, 2), "file_bytes": file_bytes,
            "loaded_bytes": loaded, "with_sparse_model_bytes": bank.task_bytes(task)}


def memory(base, tasks: int, density: float) -> dict:
    from diffprune.serving import Engine, Request, TaskBank
    from diffprune.serving.synthetic import random_patch

    with tempfile.TemporaryDirectory() as folder:
        for t in range(tasks):
            random_patch(base, density, 2, seed=100 + t).save(Path(folder) / f"t{t}.safetensors")
        file_bytes = sum(f.stat().st_size for f in Path(folder).iterdir()) / tasks
        bank = TaskBank(base, folder, memory_bytes=2**40)
        for name in bank.names():
            bank.get(name)
        mixed_bytes = bank.loaded_bytes() / tasks
        engine = Engine(bank)
        for name in bank.names():  # switching builds each TaskPatch and prepares it
            engine.run([Request(name, ["a text"])])
        switched_bytes = bank.loaded_bytes() / tasks
    return {"tasks": tasks, "file_bytes": round(file_bytes), "bank_bytes_mixed": round(mixed_bytes),
            "bank_bytes_switched": round(switched_bytes),
            "mixed_vs_file": round(mixed_bytes / file_bytes, 3),
            "switched_vs_file": round(switched_bytes / file_bytes, 3), "goal_vs_file": 1.2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=MEASURES, default=list(MEASURES))
    parser.add_argument("--density", type=float, default=0.005)
    parser.add_argument("--repeats", type=int, default=20, help="Timed calls per measure (apply_revert: x10).")
    parser.add_argument("--mixed-shapes", nargs="+", default=["16x16", "64x64"], help="TASKSxROWS batches.")
    parser.add_argument("--sparse-rows", nargs="+", type=int, default=[1, 8],
                        help="sparse_task: rows of the one task's batch (64 tokens each).")
    parser.add_argument("--sparsity", type=float, default=0.95, help="sparse_task: of every encoder Linear.")
    parser.add_argument("--memory-tasks", type=int, default=16)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the server's too).")
    parser.add_argument("--force", action="store_true", help="Measure again what is recorded.")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        run(args)
    write_table()


def run(args) -> None:
    from diffprune.base import load_base

    torch.set_num_threads(args.threads)
    base = load_base(None, 2)
    base.model.eval()
    common = {"density": args.density, "threads": args.threads}
    plan = []
    if "apply_revert" in args.only:
        plan.append(("apply_revert", {**common, "repeats": 10 * args.repeats},
                     lambda: apply_revert(base, args.density, 10 * args.repeats)))
    for shape in args.mixed_shapes if "mixed" in args.only else []:
        tasks, rows = (int(x) for x in shape.split("x"))
        plan.append(("mixed", {**common, "tasks": tasks, "rows": rows, "repeats": args.repeats, "timing": "blocks"},
                     lambda tasks=tasks, rows=rows: mixed(base, tasks, rows, args.density, args.repeats)))
    for rows in args.sparse_rows if "sparse_task" in args.only else []:
        plan.append(("sparse_task", {"threads": args.threads, "sparsity": args.sparsity, "rows": rows,
                                     "repeats": args.repeats, "timing": "blocks"},
                     lambda rows=rows: sparse_task(base, args.sparsity, rows, args.repeats)))
    if "memory" in args.only:
        plan.append(("memory", {**common, "tasks": args.memory_tasks},
                     lambda: memory(base, args.memory_tasks, args.density)))
    if "load" in args.only:
        from load_test import load_test  # benchmarks/load_test.py

        for bare in (False, True):
            opts = {**common, "clients": args.clients, "seconds": args.load_seconds, "tasks": 16, "bare": bare}
            plan.append(("load", opts, lambda bare=bare: load_test(base, args, bare)))
    for measure, options, fn in plan:
        if done_before(measure, options) and not args.force:
            print(f"skipping {measure} {options}: recorded")
            continue
        load, before = os.getloadavg(), cpu_seconds()
        figures = fn()
        rec = record(measure, options, figures)
        rec["loadavg"] = [round(x, 2) for x in load]
        rec["others_cpu_share"] = others_share(before, cpu_seconds())
        # the load average trails by a minute; what other processes took during the measure does not
        rec["contended"] = rec["others_cpu_share"] > 0.1 if rec["others_cpu_share"] is not None else load[0] > 0.5
        append(rec)


def cpu_seconds() -> tuple[float, float, float] | None:
    """(wall, CPU seconds every process used, CPU seconds this one and its children used); None
    where /proc/stat is missing (not Linux)."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(os.times()[:4])
    return time.time(), busy, own


def others_share(before, after) -> float | None:
    """The share of the machine's cores that other processes kept busy between two cpu_seconds()."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return round(max(0.0, others) / ((after[0] - before[0]) * os.cpu_count()), 3)


def write_table() -> None:
    from serving_table import table  # benchmarks/serving_table.py

    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()] if RESULTS.exists() else []
    text = README.read_text()
    block = f"{BEGIN}\n{table(rows)}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Serving many tasks on one base (`serving.py`)\n\n" + block + "\n"
    README.write_text(text)


if __name__ == "__main__":
    main()
