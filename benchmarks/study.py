"""One variant of diff pruning's defaults, run in the GLUE harness and kept as a study record.

The main table holds the current defaults; a study run changes some options and is appended,
with a tag and a one-line description, to results/diff_study.jsonl (its table is in
benchmarks/README.md). Resumable like run_glue.py. Example:

    python benchmarks/study.py --task STS-B --tag td0.05 --variant "target density 10x the budget" \\
        --set target_density=0.05 --data-dir ../shared/data/glue

Variants of the fixed-mask phase alone can branch from one L0 phase instead of repeating it:
train it once with `--set fixed_epochs=0 --l0-only` (kept in runs/, not recorded), then pass
`--from-l0 RUN_FOLDER`. The branch copies that run, whose last checkpoint is the end of its
L0 phase, and resumes it with the fixed-mask options changed; resuming reproduces an
uninterrupted run (tests/test_resume.py), so the record is the one a whole run with these
settings would give, in about half the time.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import fields
from pathlib import Path

from run_glue import COMMON, FP32, HERE, RUNS, execute, run_name, to_record
from table import write_table

from diffprune.methods import get_method
from diffprune.training.checkpoint import latest_checkpoint

STUDY = HERE / "results" / "diff_study.jsonl"
# Options read only after the L0 phase (by the projection, the fixed-mask phase or the save).
AFTER_L0 = ("fixed_lr", "fixed_epochs", "fixed_init", "budget_scope", "projection", "patch_dtype")


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def branch_from_l0(source: Path, target: Path, config: dict) -> None:
    """Copy a finished L0-only run into `target`, set to resume with `config`'s fixed-mask options."""
    checkpoint = latest_checkpoint(source)
    if checkpoint is None or not (source / "run.json").exists() \
            or json.loads((checkpoint / "progress.json").read_text())["phase"] != 0:
        raise SystemExit(f"{source} is not a finished run whose last checkpoint ends its L0 phase "
                         "(train it with --set fixed_epochs=0)")
    settings = json.loads((source / "settings.json").read_text())
    defaults = {f.name: f.default for f in fields(get_method(config["method"]).Config)}
    mine = {k: config.get(k, defaults[k]) for k in settings["method_options"]}
    differs = sorted(k for k in mine if mine[k] != settings["method_options"][k] and k not in AFTER_L0)
    general = sorted(k for k in config if k not in mine and settings.get(k) != config[k])  # task, seed, ...
    if differs or general:
        raise SystemExit(f"{source} trained its L0 phase with other settings ({', '.join(differs + general)})")
    if target.exists():
        return  # a branch made before: resume it
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("run.json", "patch.safetensors"))
    settings["method_options"] = mine
    (target / "settings.json").write_text(json.dumps(settings, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--method", default="diff-struct")
    parser.add_argument("--budget", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tag", required=True, help="short name appended to the run's name")
    parser.add_argument("--variant", help="what this run changes, in a line (required unless --l0-only)")
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="options that differ")
    parser.add_argument("--from-l0", type=Path, help="branch from this run's finished L0 phase")
    parser.add_argument("--l0-only", action="store_true", help="train the run to branch from; record nothing")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    if not args.l0_only and not args.variant:
        parser.error("--variant is required")
    options = dict(item.split("=", 1) for item in args.set)
    config = {**COMMON, "budget": args.budget, **FP32, **{k: parse_value(v) for k, v in options.items()},
              "task": args.task, "method": args.method, "seed": args.seed}
    name = f"{run_name(config)}-{args.tag}"
    if args.l0_only:
        if config.get("fixed_epochs") != 0:
            parser.error("--l0-only needs --set fixed_epochs=0")
        execute(config, args.data_dir, name)
        return
    if STUDY.exists() and any(json.loads(line)["run"] == name for line in STUDY.read_text().splitlines() if line):
        print(f"{name} is already recorded")
        return
    if args.from_l0:
        branch_from_l0(args.from_l0, RUNS / name, config)
    record = {**to_record(name, config, execute(config, args.data_dir, name)), "variant": args.variant}
    if args.from_l0:
        record["branched_from"] = args.from_l0.name
    with open(STUDY, "a") as f:
        f.write(json.dumps(record) + "\n")
    write_table(HERE / "results" / "glue.jsonl", HERE / "README.md")


if __name__ == "__main__":
    main()
