"""The benchmark scripts: every planned run is a valid configuration, and the goal checks read
the records the way the issue states them."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import run_glue  # noqa: E402
import table  # noqa: E402


@pytest.mark.parametrize("config", run_glue.planned(["MRPC"], [m for m, _, _ in run_glue.VARIANTS], 2),
                         ids=run_glue.run_name)
def test_planned_runs_are_valid_settings(config):
    """A config the benchmark would pass to `diffprune train --config` is accepted as it is
    (a run that fails on its settings costs a queue slot, found only when it starts)."""
    from diffprune.cli import split_settings
    from diffprune.methods import build_method

    settings, options = split_settings(config)
    build_method(settings.method, options)


def run(task, method, score, budget=None, lora_r=None, artifact_bytes=1000):
    settings = {"lora_r": lora_r} if lora_r else {}
    return {"task": task, "method": method, "budget": budget, "score": score, "settings": settings,
            "artifact_bytes": artifact_bytes}


def goal_rows(records):
    rows = table.render_goals(records).splitlines()[2:]
    return {row.split(" | ")[0].lstrip("| "): row for row in rows}


def test_goals_compare_common_tasks_with_median_over_seeds():
    records = [run("RTE", "full", 0.60), run("RTE", "full", 0.58), run("MRPC", "full", 0.85),
               run("STS-B", "full", 0.86),  # not measured for the patch: left out of both averages
               run("RTE", "diff-struct", 0.57, 0.005), run("MRPC", "diff-struct", 0.86, 0.005),
               run("RTE", "diff-struct", 0.50, 0.001), run("MRPC", "diff-struct", 0.80, 0.001)]
    rows = goal_rows(records)
    within = rows["diff-struct @0.005: within 1.0 point of full finetuning"]
    # patch (57 + 86) / 2 = 71.5 against full (59 + 85) / 2 = 72.0: -0.5 is within 1.0
    assert "RTE 1/2, MRPC 1/1" in within and "| 71.5 | 72.0 | -0.5 | yes |" in within
    assert rows["diff-struct @0.001: within 1.5 points of full finetuning"].endswith("| no |")
    assert "not measured yet" in rows["diff-struct @0.005: above SHiRA with about as many changed entries"]


def test_lora_goal_only_counts_adapters_at_least_as_large_as_the_patch():
    records = [run("MRPC", "diff-struct", 0.86, 0.005, artifact_bytes=500),
               run("MRPC", "lora", 0.90, lora_r=8, artifact_bytes=300),
               run("MRPC", "lora", 0.84, lora_r=16, artifact_bytes=600)]
    rows = goal_rows(records)
    assert not any("LoRA r8" in name for name in rows)
    assert rows["diff-struct @0.005: above LoRA r16 (adapter ≥ the 500 B patch)"].endswith("| +2.0 | yes |")


def test_full_finetuning_floors_use_the_median_over_seeds():
    records = [run("RTE", "full", 0.60), run("RTE", "full", 0.52), run("MRPC", "full", 0.849)]
    rows = goal_rows(records)
    assert rows["full: RTE at least 55 (the foundation's floor)"].endswith("| 56.0 | 55.0 | +1.0 | yes |")
    assert rows["full: MRPC at least 85 (the foundation's floor)"].endswith("| no |")
    assert "not measured yet" in rows["full: SST-2 at least 87 (the foundation's floor)"]
