"""GLUE dev benchmark: every method in the same harness, one JSON line per finished run.

Resumable: a run already in results/glue.jsonl is skipped, and a run whose folder holds a
checkpoint continues from it (`--resume`). Each run is its own process, so its peak memory is
its own. Usage:

    python benchmarks/run_glue.py --data-dir ../shared/data/glue                # the whole plan
    python benchmarks/run_glue.py --tasks MRPC RTE --methods full diff-struct@0.005 --seeds 1
    python benchmarks/run_glue.py --table-only                                  # rewrite the table
    python benchmarks/run_glue.py --profile fast --methods full abp@0.5 ...     # the fast profile
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from table import FROZEN_ENCODER_HEAD, write_table

from diffprune.methods import METHODS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "glue.jsonl"
RUNS = HERE / "runs"


@dataclass(frozen=True)
class Profile:
    """Settings added to every run of a plan, and where its records, run folders and tables go.
    Records of two profiles never share a table: each compares methods in its own settings."""
    settings: dict
    results: Path
    runs: Path
    table: str  # README sections glue{table}-table and goals{table}-table


PROFILES = {
    # the settings every method's first records were made in
    "paper": Profile({}, RESULTS, RUNS, ""),
    # bf16 matrix products (Zen 4's bf16 instructions: 2.4x a float32 GEMM here) and
    # length-grouped batches (less padding): ~4x cheaper per run on this CPU, so that a grid can
    # measure full finetuning again beside the methods it compares
    "fast": Profile({"mixed_precision": "bf16", "group_by_length": True}, HERE / "results" / "glue-fast.jsonl",
                    RUNS / "fast", "-fast"),
}

TASKS = ["MRPC", "STS-B", "RTE", "SST-2"]
# Hyperparameters for the 22M-parameter MiniLM, the same for every task; SST-2 (67k examples)
# gets half an epoch (1,053 steps of 32) instead of three, for every method alike: one epoch
# takes ~26 min per phase on 2 CPU cores. (A quarter epoch left full finetuning below the
# floor of 87; those records are kept in results/glue-sst2-quarter-epoch.jsonl.) Learning rates are each method's
# default (`diffprune methods`): full 5e-5, BitFit 1e-3, LoRA and SHiRA 5e-4, diff pruning
# 1e-4 for w in the L0 phase and, for the fixed-mask phase, 5e-4 at 0.5% and 1.5e-3 at 0.1%.
# (The 0.1% runs made at a flat 5e-4 are kept in results/glue-b0.001-fixed-lr-5x.jsonl.)
COMMON = {"batch_size": 32, "max_seq_length": 128, "warmup_ratio": 0.1, "weight_decay": 0.01, "epochs": 3}
EPOCHS = {"SST-2": 0.5}
# Patches keep fp32 values here so that storage.py can measure what fp16 / bf16 values cost.
FP32 = {"patch_dtype": "float32"}
# The STS-B rate study of distil (below): its regression students learn the teacher's outputs.
STUDY = {"tasks": ["STS-B"], "regression_target": "teacher", **FP32}
# Gradual magnitude pruning of the finetuned model without distillation (distil's options).
GMP = {"student_init": "teacher", "distil_loss": "task"}
# (method, its options, seeds). The plan runs in tiers so that an interrupted plan still
# compares the methods that matter most on every task: first seeds of the main methods on the
# small tasks, then the other variants, then second seeds, SST-2 (the long one) last.
VARIANTS: list[tuple[str, dict, list[int]]] = [
    ("full", {"lr": 5e-5}, [1, 2]),
    ("bitfit", {"lr": 1e-3}, [1]),
    ("lora", {"lr": 5e-4, "lora_r": 8, "lora_alpha": 16, "lora_targets": "query,value"}, [1]),
    ("diff-struct", {"budget": 0.005, **FP32}, [1, 2]),
    ("shira", {"budget": 0.005}, [1]),
    # r16: the smallest LoRA whose adapter file is at least as large as the 0.5% fp16 patch
    # (r8 on query and value: 301,520 bytes; the MRPC patch: 341,872).
    ("lora", {"lr": 5e-4, "lora_r": 16, "lora_alpha": 32, "lora_targets": "query,value"}, [1]),
    ("diff", {"budget": 0.005, **FP32}, [1]),
    ("nonadaptive", {"budget": 0.005, **FP32}, [1]),
    # two seeds: at 0.1% the patch is small enough that RTE (277 dev examples) swings by seed
    ("diff-struct", {"budget": 0.001, **FP32}, [1, 2]),
    # Beside diff-struct's 0.1% row: whether the top 0.1% of a finetuned diff can learn the task
    # (on RTE, diff-struct's 0.1% mask stays near the majority class; see the study). Two seeds,
    # since RTE's 277 dev examples swing by about 3 points by seed.
    ("nonadaptive", {"budget": 0.001, **FP32}, [1, 2]),
    # Adapting by pruning and the paper's comparisons: masks over the frozen pretrained weights.
    # Each mask method trains 3 epochs under its evolving mask, then 1 epoch (a third of the
    # task's epochs) of the head alone with the exact mask; head-only gets the same 4 epochs.
    # Learning rates: the methods' defaults (abp: 2e-4 for the scores; every head: 3e-3). Their
    # head is FROZEN_ENCODER_HEAD (table.py), not the model's own, which found no signal on
    # STS-B's frozen features (head-only -6.0; see benchmarks/README.md).
    ("abp", {"sparsity": 0.5}, [1, 2]),
    ("head", {}, [1]),
    ("magnitude", {"sparsity": 0.5}, [1]),
    ("random-mask", {"sparsity": 0.5}, [1]),
    ("abp", {"sparsity": 0.9}, [1]),
    ("magnitude", {"sparsity": 0.9}, [1]),
    ("random-mask", {"sparsity": 0.9}, [1]),
    ("abp", {"sparsity": 0.2}, [1]),
    # the paper's start for the scores (abp's default starts them in magnitude order)
    ("abp", {"sparsity": 0.5, "score_init": "paper"}, [1]),
    # Pruning at distilling (SparseBERT) and its comparators, in the same epochs as every method:
    # each learns from (or, for gradual magnitude pruning, starts from) the task's full finetuning
    # run of seed 1, the teacher row; distil's default constant rate 1e-3 (below). The
    # 2- and 1-layer dense students keep 33% and 17% of the encoder's Linear weights.
    ("distil", {"sparsity": 0.95, **FP32}, [1, 2]),
    ("distil", {"sparsity": 0.9, **FP32}, [1]),
    ("distil", {"sparsity": 0.8, **FP32}, [1]),
    # gradual magnitude pruning as it is practised: at a finetuning rate (the paper's 3e-5); at
    # distil's default 1e-3 the finetuned model it starts from is lost (STS-B: 0.0 after one epoch)
    ("distil", {"sparsity": 0.95, **GMP, "lr": 3e-5, **FP32}, [1]),
    ("distil", {"sparsity": 0.9, **GMP, "lr": 3e-5, **FP32}, [1]),
    ("distil", {"sparsity": 0.95, **GMP, "lr": 1e-3, **FP32}, [1]),
    ("distil", {"sparsity": 0.0, **FP32}, [1]),
    ("distil", {"sparsity": 0.0, "student_layers": 2}, [1]),
    ("distil", {"sparsity": 0.0, "student_layers": 1}, [1]),
    # the storage question: the same 95% patch without any change to the embeddings
    ("distil", {"sparsity": 0.95, "freeze_embeddings": True, **FP32}, [1]),
    # Why distil's default rate is 1e-3, not the paper's 3e-5 (set for ~80k steps; 3 epochs of
    # STS-B are 540): the rate at 95%, the pruning schedule ending at two thirds of the phase,
    # distillation without pruning at the paper's rate, and the paper's rate at its 12 epochs.
    # Made before the prediction term of a regression task learned the labels, as the paper's
    # code does: these learn the teacher's outputs (STUDY).
    *[("distil", {"sparsity": 0.95, "lr": lr, **STUDY}, [1]) for lr in (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)],
    ("distil", {"sparsity": 0.95, "lr": 1e-3, "prune_reach": 0.67, **STUDY}, [1]),
    ("distil", {"sparsity": 0.95, "lr": 1e-4, "prune_reach": 0.5, **STUDY}, [1]),
    ("distil", {"sparsity": 0.95, "lr": 3e-4, "kd_terms": "prediction", **STUDY}, [1]),
    *[("distil", {"sparsity": 0.0, "lr": lr, **STUDY}, [1]) for lr in (3e-5, 1e-3)],
    ("distil", {"sparsity": 0.8, "lr": 3e-5, **STUDY}, [1]),
    ("distil", {"sparsity": 0.95, "lr": 3e-5, "epochs_factor": 4, "tasks": ["STS-B"], **FP32}, [1]),
    # ... and the default rate at four times the epochs: is the gap at 95% the short schedule?
    ("distil", {"sparsity": 0.95, "epochs_factor": 4, **FP32}, [1]),
    # ... with the pruning done by two thirds of them (the student then trains at 95%)
    ("distil", {"sparsity": 0.95, "epochs_factor": 4, "prune_reach": 0.67, "tasks": ["STS-B"], **FP32}, [1]),
    # The paper's rate on the classification tasks (RTE and MRPC), for distil at 95% and the
    # dense students. (These were first run as the default by mistake: a run queue started on
    # code from before the default changed, each run's log shows its rate.)
    ("distil", {"sparsity": 0.95, "lr": 3e-5, "tasks": ["MRPC", "RTE"], **FP32}, [1]),
    ("distil", {"sparsity": 0.0, "lr": 3e-5, "tasks": ["MRPC", "RTE"], **FP32}, [1]),
    *[("distil", {"sparsity": 0.0, "student_layers": n, "lr": 3e-5, "tasks": ["MRPC", "RTE"]}, [1]) for n in (2, 1)],
]
MASK_METHODS = {"abp", "magnitude", "random-mask"}
# how the plan set a run's settings: recorded with them, but not a training option
PLAN_ONLY = ("epochs_factor",)
TEACHER = "{task}-full-s1"  # in the profile's run folder; the distil variants' --teacher
MAIN = 4  # the first four variants form the first tier


def planned(tasks: list[str], methods: list[str], max_seeds: int, profile: Profile = PROFILES["paper"]) -> list[dict]:
    plan = []
    for position, (method, options, seeds) in enumerate(VARIANTS):
        label = method + (f"@{options['budget']}" if "budget" in options else "") \
            + (f"@r{options['lora_r']}" if "lora_r" in options else "") \
            + (f"@{options['sparsity']}" if "sparsity" in options else "") \
            + "".join(f"@{tag}" for tag in variant_tags({**options, "method": method}))
        if method not in methods and label not in methods:
            continue
        for seed_index, seed in enumerate(seeds[:max_seeds]):
            for task in [t for t in tasks if t in options.get("tasks", tasks)]:
                tier = 3 if task == "SST-2" else (2 if seed_index else (0 if position < MAIN else 1))
                # (a variant's "tasks" says where it runs: not a setting of the run)
                config = {**COMMON, **profile.settings, **{k: v for k, v in options.items() if k != "tasks"},
                          "task": task, "method": method, "seed": seed}
                config["epochs"] = EPOCHS.get(task, COMMON["epochs"]) * options.get("epochs_factor", 1)
                if method in MASK_METHODS:  # the last phase: the head alone, with the exact mask
                    config["head_epochs"] = round(config["epochs"] / 3, 4)
                elif method == "head":  # as many epochs of head training as the mask methods have
                    config["epochs"] = round(config["epochs"] * 4 / 3, 4)
                if method in MASK_METHODS | {"head"}:
                    config["head"] = FROZEN_ENCODER_HEAD
                elif method == "distil":
                    config["teacher"] = str((profile.runs / TEACHER.format(task=task)).relative_to(HERE))
                plan.append(((tier, tasks.index(task), position), config))
    return [config for _, config in sorted(plan, key=lambda item: item[0])]


def run_name(config: dict) -> str:
    budget, rank, sparsity = config.get("budget"), config.get("lora_r", 8), config.get("sparsity")
    return (f"{config['task']}-{config['method']}" + (f"-b{budget}" if budget else "")
            + (f"-r{rank}" if rank != 8 else "") + (f"-sp{sparsity}" if sparsity else "")
            + "".join(f"-{tag}" for tag in variant_tags(config)) + f"-s{config['seed']}")


def variant_tags(options: dict) -> list[str]:
    """What sets a variant apart from its method at the same sparsity (a distil comparator, a
    head other than the model's own, a rate other than the method's default), for names and
    labels."""
    lr = options.get("lr")
    return ((["gmp"] if options.get("student_init") == "teacher" else [])
            + ([f"lr{lr:g}"] if lr is not None and lr != METHODS[options["method"]].default_lr else [])
            + ([f"reach{options['prune_reach']:g}"] if "prune_reach" in options else [])
            + ([f"kd-{options['kd_terms'].replace(',', '-')}"] if "kd_terms" in options else [])
            + (["reg-teacher"] if options.get("regression_target") == "teacher" else [])
            + ([f"L{options['student_layers']}"] if options.get("student_layers") else [])
            + (["frozen-emb"] if options.get("freeze_embeddings") else [])
            + (["paper-init"] if options.get("score_init") == "paper" else [])
            + ([f"x{options['epochs_factor']}-epochs"] if options.get("epochs_factor", 1) != 1 else [])
            + ([options["head"]] if options.get("head", "model") != "model" else []))


def recorded(results: Path) -> dict[str, dict]:
    """The settings of every recorded run, by run name."""
    if not results.exists():
        return {}
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {record["run"]: record["settings"] for record in records}


def run_settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("task", "method", "seed")}


def train_config(config: dict) -> dict:
    """What `diffprune train --config` gets of a planned run: its settings and options."""
    return {k: v for k, v in config.items() if k not in PLAN_ONLY}


def execute(config: dict, data_dir: str | None, name: str | None = None, runs: Path = RUNS) -> dict:
    out = runs / (name or run_name(config))
    out.mkdir(parents=True, exist_ok=True)
    if "teacher" in config:  # recorded relative to this folder, given to the run absolute
        config = {**config, "teacher": str(HERE / config["teacher"])}
    (out.parent / f"{out.name}.json").write_text(json.dumps(train_config(config), indent=2))
    cmd = [sys.executable, "-m", "diffprune", "train", "--config", str(out.parent / f"{out.name}.json"),
           "--output", str(out), "--checkpoint-every", "100", "--log-every", "20"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if (out / "checkpoints" / "latest").exists():
        cmd.append("--resume")
    elif (out / "settings.json").exists():
        cmd.append("--overwrite")  # started but never checkpointed: start again
    run_child(cmd)
    return json.loads((out / "run.json").read_text())


def ensure_teacher(config: dict, data_dir: str | None, profile: Profile) -> None:
    """A distil variant's teacher is the task's full run of seed 1, whose folder (its model)
    may be missing where only its record came along: train it again into that folder (the
    record stays the one already written; the distil record notes the score of the teacher it
    learned from)."""
    folder = HERE / config["teacher"]
    if (folder / "run.json").exists():
        return
    full = planned([config["task"]], ["full"], 1, profile)[0]
    if profile.runs / run_name(full) != folder:
        sys.exit(f"{config['task']}: the teacher {folder} is not the full run this plan makes ({run_name(full)})")
    print(f"== {run_name(full)} (the teacher of the distil variants; its folder is missing)", flush=True)
    execute(full, data_dir, runs=profile.runs)


def run_child(cmd: list[str]) -> None:
    """Run one training process; stopping this script (Ctrl-C or a plain `kill`) stops it too.

    By default SIGTERM ends Python at once, and the child would train on alone; as an exception
    it reaches `subprocess.run`, which kills the child. The run resumes from its last checkpoint.
    """
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    subprocess.run(cmd, check=True)


def to_record(name: str, config: dict, run: dict) -> dict:
    return {
        "run": name,
        "model": run["model"],
        "task": run["task"],
        "method": run["method"],
        "budget": run.get("budget"),
        "sparsity": config.get("sparsity"),
        "variant": " ".join(variant_tags(config)) or None,
        "teacher_score": json.loads((HERE / config["teacher"] / "run.json").read_text())["score"]
        if config.get("teacher") else None,
        "seed": config["seed"],
        "metric": run["metric"],
        "score": run["score"],
        "dev": run["dev"],
        "trainable_params": run["trainable_params"],
        "base_params": run["base_params"],
        "seconds": run["seconds"],
        "cpu_seconds": run.get("cpu_seconds"),  # runs before the library recorded it: none
        "peak_rss_mb": run["peak_rss_mb"],
        "device": run["device"],
        "settings": run_settings(config),
        "library_version": run["diffprune_version"],
        "method_options": run["method_options"],  # every option as the run used it, defaults included
        "lr": run.get("lr"),  # the main rate it used (records before 2026-12-07: see settings and log.csv)
        "evals": run["evals"],
        # the weights a user keeps for this task: patch, adapter or full model file(s)
        "artifact_bytes": sum(size for file, size in run["files"].items() if file.endswith(".safetensors")),
        **{k: run[k] for k in ("nnz", "patch_bytes", "learned_density", "reached_at_step", "tensor_sparsity",
                               "student_layers", "attention_target") if k in run},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--methods", nargs="+", default=sorted({m for m, _, _ in VARIANTS}),
                        help="method names, or name@budget / lora@rRANK for one variant")
    parser.add_argument("--seeds", type=int, default=2, help="at most this many seeds per method")
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default: $GLUE_DIR)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="paper",
                        help="paper: the settings of the main table; fast: bf16 and length-grouped batches, its own table")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    profile = PROFILES[args.profile]
    if not args.table_only:
        done = recorded(profile.results)
        for config in planned(args.tasks, args.methods, args.seeds, profile):
            name = run_name(config)
            if name in done:
                if done[name] != run_settings(config):
                    # Skipping would put a run made with other settings in the table.
                    sys.exit(f"{name} is recorded with other settings ({done[name]}); move its record out of "
                             f"{profile.results} and its folder out of {profile.runs} to run it again")
                continue
            if config.get("teacher"):
                ensure_teacher(config, args.data_dir, profile)
            print(f"== {name}", flush=True)
            record = to_record(name, config, execute(config, args.data_dir, runs=profile.runs))
            profile.results.parent.mkdir(parents=True, exist_ok=True)
            with open(profile.results, "a") as f:
                f.write(json.dumps(record) + "\n")
            write_table(profile.results, HERE / "README.md", profile.table)
    write_table(profile.results, HERE / "README.md", profile.table)


if __name__ == "__main__":
    main()
