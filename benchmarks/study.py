"""One variant of diff pruning's defaults, run in the GLUE harness and kept as a study record.

The main table holds the current defaults; a study run changes some options and is appended,
with a tag and a one-line description, to results/diff_study.jsonl (its table is in
benchmarks/README.md). Resumable like run_glue.py. Example:

    python benchmarks/study.py --task STS-B --tag td0.05 --variant "target density 10x the budget" \\
        --set target_density=0.05 --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json

from run_glue import COMMON, FP32, HERE, execute, run_name, to_record
from table import write_table

STUDY = HERE / "results" / "diff_study.jsonl"


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--method", default="diff-struct")
    parser.add_argument("--budget", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tag", required=True, help="short name appended to the run's name")
    parser.add_argument("--variant", required=True, help="what this run changes, in a line")
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="options that differ")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    options = dict(item.split("=", 1) for item in args.set)
    config = {**COMMON, "budget": args.budget, **FP32, **{k: parse_value(v) for k, v in options.items()},
              "task": args.task, "method": args.method, "seed": args.seed}
    name = f"{run_name(config)}-{args.tag}"
    if STUDY.exists() and any(json.loads(line)["run"] == name for line in STUDY.read_text().splitlines() if line):
        print(f"{name} is already recorded")
        return
    record = {**to_record(name, config, execute(config, args.data_dir, name)), "variant": args.variant}
    with open(STUDY, "a") as f:
        f.write(json.dumps(record) + "\n")
    write_table(HERE / "results" / "glue.jsonl", HERE / "README.md")


if __name__ == "__main__":
    main()
