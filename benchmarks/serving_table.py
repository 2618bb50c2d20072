"""The markdown table of benchmarks/serving.py's records (the newest of each thing measured)."""

from __future__ import annotations

import json


def latest(rows: list[dict], measure: str) -> list[dict]:
    """The newest record of each thing measured (a shape, a server), whatever its repeats or
    duration: a full run replaces a short one in the table; the records file keeps both."""
    found: dict[str, dict] = {}
    for r in rows:
        if r.get("measure") == measure:
            o = r["options"]
            found[json.dumps([o.get("density"), o.get("tasks"), o.get("rows"), o.get("bare"), o.get("threads")])] = r
    return list(found.values())


def load_note(r: dict) -> str:
    others = f", others {100 * r['others_cpu_share']:.0f}%" if r.get("others_cpu_share") is not None else ""
    return f"{r['loadavg'][0]:.2f}{others}" + (" (contended)" if r.get("contended") else "")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def table(rows: list[dict]) -> str:
    if not rows:
        return "No records yet: run `python benchmarks/serving.py`."
    out = ["Random 0.5% add patches on sentence-transformers/all-MiniLM-L6-v2 (timing and memory depend on how "
           "many entries a patch changes and where, not on their values); 2 torch threads unless said. "
           "Load: the 1-minute load average at the start of the measure and, where recorded, the share of the "
           "cores other processes used during it (contended: over 10%; where not recorded, a load average "
           "over 0.5).",
           ""]
    if latest(rows, "apply_revert"):
        out += ["Switching: apply + revert of one patch (goal ≤ 1 ms), as the task bank holds it (the compact "
                "form of its file); beside it the same patch as a TaskPatch in memory (fp32 values), timed "
                "alternately (records before the compact form timed the TaskPatch only).", "",
                "| entries | apply + revert (median) | p90 | TaskPatch | threads | load |", "|---|---|---|---|---|---|"]
        out += [f"| {r['nnz']:,} | {r['apply_revert_ms']:.3f} ms | {r['p90_ms']:.3f} ms | "
                f"{_ms(r.get('taskpatch_apply_revert_ms'))} | {r['options']['threads']} | {load_note(r)} |"
                for r in latest(rows, "apply_revert")]
        out.append("")
    if latest(rows, "mixed"):
        out += ["Mixed-task batches of 64-token rows, one forward (throughput against the bare base on the same "
                "batch; goal ≥ 0.95x). PEFT: mixed LoRA batches (r 8, query and value, `adapter_names=`). Timing: "
                "blocks (each engine several calls in a row, as a server running it sees it) or calls (alternated "
                "call by call, the records before blocks).", "",
                "| tasks x rows | threads | bare base | diffprune mixed | PEFT LoRA mixed | diffprune / bare | "
                "PEFT / bare | repeats | timing | load |", "|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['tasks']} x {r['rows']} | {r['options']['threads']} | {r['bare_ms']:.1f} ms | "
                f"{r['diffprune_ms']:.1f} ms | {r['peft_lora_ms']:.1f} ms | {r['diffprune_vs_bare']:.3f}x | "
                f"{r['peft_lora_vs_bare']:.3f}x | {r['options']['repeats']} | {r['options'].get('timing', 'calls')} | "
                f"{load_note(r)} |"
                for r in latest(rows, "mixed")]
        out.append("")
    sparse = [r for r in rows if r.get("measure") == "sparse_task"]
    if sparse:
        out += ["A pruned task (every encoder Linear at the sparsity given, per matrix, random positions) by "
                "switching onto the dense base and on its own sparse model (`diffprune serve --sparse`), one "
                "batch of rows x 64 tokens, timed in blocks; memory: its patch file, what the bank holds to switch "
                "it, and what it holds on its sparse model (the kept weights and the head: every tensor the patch "
                "leaves alone is the base's, and the patch is dropped once the sparse model is made).", "",
                "| sparsity | rows | threads | switching | sparse model | speed-up | largest logit gap | build | "
                "file | held to switch | held on its sparse model | load |", "|---" * 12 + "|"]
        newest = {(r["options"]["sparsity"], r["options"]["rows"], r["options"]["threads"]): r for r in sparse}
        out += [f"| {r['sparsity']:g} | {r['rows']} | {r['options']['threads']} | {r['switching_ms']:.1f} ms | "
                f"{r['sparse_ms']:.1f} ms | {r['speedup']:.2f}x | {r['max_abs_logit_gap']:.1e} | "
                f"{r['build_s']:.1f} s | "
                f"{r['file_bytes']:,} B | {r['loaded_bytes']:,} B | {r['with_sparse_model_bytes']:,} B | "
                f"{load_note(r)} |" for r in newest.values()]
        out.append("")
    if latest(rows, "memory"):
        out += ["Memory per loaded task against its patch file (fp16 values; goal ≤ 1.2x), the bytes of every "
                "array and tensor the bank holds for it. Loaded: the compact form that mixed batches and "
                "switching both read (gap-coded positions, the file's fp16 values, per-tensor table, embedding "
                "checkpoints, the head); after switching: plus what switching keeps per task (the index of the "
                "tensors it writes). Records before the compact form held int32 positions for mixed batches and "
                "a TaskPatch plus prepared entries for switching.", "",
                "| tasks | file | loaded | ratio | after switching | ratio | load |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['tasks']} | {r['file_bytes']:,} B | {r['bank_bytes_mixed']:,} B | {r['mixed_vs_file']:.2f}x | "
                f"{r['bank_bytes_switched']:,} B | {r['switched_vs_file']:.2f}x | {load_note(r)} |" for r in latest(rows, "memory")]
        out.append("")
    if latest(rows, "load"):
        out += ["HTTP load on 127.0.0.1 (`diffprune serve`, one text per request over 16 tasks; clients and "
                "server share the machine).", "",
                "| server | clients | seconds | requests | errors | throughput | p50 | p99 | exit | load |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {'bare base (head-only patches)' if r['bare'] else '16 patches'} | {r['options']['clients']} | "
                f"{r['seconds']} | {r['requests']:,} | {r['errors']} | {r['throughput_rps']:.1f} req/s | "
                f"{r['p50_ms']} ms | {r['p99_ms']} ms | {r['server_exit']} | {load_note(r)} |"
                for r in latest(rows, "load")]
    return "\n".join(out).rstrip()
