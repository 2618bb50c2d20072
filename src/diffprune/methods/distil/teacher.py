"""The teacher: a finished full-finetuning run of the same task on the same base (`--teacher`),
checked before anything trains; or a copy of the base, finetuned first within the run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from torch import nn

from diffprune.base import BaseModel, load_base
from diffprune.errors import DiffpruneError


def load_teacher(run_dir: str, base: BaseModel) -> tuple[nn.Module, dict]:
    """The teacher model of a finished `full` run folder and its run record, frozen. Refused in
    one line when the folder is no finished full run, or its base differs from `base` (its task
    and labels are checked by `check_teacher_fits`, once the task is known)."""
    run = Path(run_dir).expanduser()
    record_file = run / "run.json"
    if not record_file.is_file():
        raise DiffpruneError(f"--teacher {run} is not a finished run folder (no run.json)")
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError as e:
        raise DiffpruneError(f"--teacher {run}: its run.json is not valid JSON ({e})") from None
    if record.get("method") != "full":
        raise DiffpruneError(f"--teacher {run} is a '{record.get('method')}' run; the teacher must be a full "
                             "finetuning run (--method full)")
    if record.get("fingerprint") != base.fingerprint:
        raise DiffpruneError(f"--teacher {run} was finetuned from another base ({record.get('model')}, "
                             f"{record.get('fingerprint')}), not this one ({base.name}, {base.fingerprint})")
    folder = run / "model"
    if not (folder / "config.json").is_file():
        raise DiffpruneError(f"--teacher {run} holds no model/ (was it trained with --no-save-model?)")
    config = base.model.config
    teacher = load_base(folder, config.num_labels, labels=base.labels,
                        regression=config.problem_type == "regression").model
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher, record


def check_teacher_fits(record: dict, run_dir: str, task: str, base: BaseModel) -> None:
    """The teacher must have learned this task, and its outputs mean what the student's do: the
    same count, names and kind of labels."""
    run = Path(run_dir).expanduser()
    if record.get("task") != task:
        raise DiffpruneError(f"--teacher {run} was trained on {record.get('task')}, not {task}")
    saved = json.loads((run / "model" / "config.json").read_text())
    config = base.model.config
    labels = [saved.get("id2label", {}).get(str(i)) for i in range(len(saved.get("id2label", {})))]
    theirs = (saved.get("num_labels", len(labels)), saved.get("problem_type"), labels if base.labels else None)
    ours = (config.num_labels, config.problem_type, list(base.labels) if base.labels else None)
    if theirs != ours:
        raise DiffpruneError(f"--teacher {run} predicts other labels ({theirs[0]} {theirs[1]}: {theirs[2]}) than "
                             f"this task ({ours[0]} {ours[1]}: {ours[2]})")


def teacher_copy(base: BaseModel) -> nn.Module:
    """The model the in-run teacher phase finetunes: the base with its fresh head, copied."""
    return copy.deepcopy(base.model)
