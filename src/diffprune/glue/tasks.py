"""The nine GLUE tasks: file layout, label order, metrics and submission names.

Everything task-specific lives here so that the reader, the metrics and the submission
writer never branch on task names themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffprune.errors import DiffpruneError


@dataclass(frozen=True)
class TaskSpec:
    name: str  # canonical GLUE spelling, e.g. "STS-B"
    text_columns: tuple[str, ...]  # header names of the text columns in the GLUE tsv files
    label_column: str | None  # header name of the label in train/dev; None for CoLA (no header)
    labels: tuple[str, ...] | None  # label strings in HF `nyu-mll/glue` id order; None = regression
    metrics: tuple[str, ...]
    main_metric: str  # the number the paper tables report
    dev_splits: tuple[str, ...]
    test_splits: tuple[str, ...]
    hf_config: str
    hf_text_columns: tuple[str, ...]
    # hash=False: a dict is unhashable, and the other fields already identify the task
    submission_names: dict[str, str] = field(hash=False, compare=False)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.dev_splits, *self.test_splits)


def _pair_task(name, labels, metrics, main, hf_config, **overrides) -> TaskSpec:
    # Most tasks are sentence pairs stored as sentence1/sentence2 with a `label` column.
    kwargs = dict(
        name=name,
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        labels=labels,
        metrics=metrics,
        main_metric=main,
        dev_splits=("dev",),
        test_splits=("test",),
        hf_config=hf_config,
        hf_text_columns=("sentence1", "sentence2"),
        submission_names={"test": name},
    )
    kwargs.update(overrides)
    return TaskSpec(**kwargs)


_BINARY = ("0", "1")
_ENTAIL = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        # CoLA train/dev have no header: columns are [source, label, label_notes, sentence],
        # so the reader uses positions; text_columns names the column of the test file.
        _pair_task("CoLA", _BINARY, ("mcc",), "mcc", "cola",
                   text_columns=("sentence",), label_column=None, hf_text_columns=("sentence",)),
        _pair_task("SST-2", _BINARY, ("accuracy",), "accuracy", "sst2",
                   text_columns=("sentence",), hf_text_columns=("sentence",)),
        _pair_task("MRPC", _BINARY, ("f1", "accuracy"), "f1", "mrpc",
                   text_columns=("#1 String", "#2 String"), label_column="Quality"),
        _pair_task("STS-B", None, ("pearson", "spearman"), "spearman", "stsb",
                   label_column="score"),
        _pair_task("QQP", _BINARY, ("f1", "accuracy"), "f1", "qqp",
                   text_columns=("question1", "question2"), label_column="is_duplicate",
                   hf_text_columns=("question1", "question2")),
        _pair_task("MNLI", ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy",
                   "mnli", label_column="gold_label",
                   dev_splits=("dev_matched", "dev_mismatched"),
                   test_splits=("test_matched", "test_mismatched"),
                   hf_text_columns=("premise", "hypothesis"),
                   submission_names={"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}),
        _pair_task("QNLI", _ENTAIL, ("accuracy",), "accuracy", "qnli",
                   text_columns=("question", "sentence"), hf_text_columns=("question", "sentence")),
        _pair_task("RTE", _ENTAIL, ("accuracy",), "accuracy", "rte"),
        _pair_task("WNLI", _BINARY, ("accuracy",), "accuracy", "wnli"),
    )
}


def _norm(name: str) -> str:
    # "STS-B", "stsb", "sts_b" and "STSB" all mean the same task (and the same folder).
    return name.lower().replace("-", "").replace("_", "").strip()


_ALIASES: dict[str, str] = {}
for _spec in TASKS.values():
    _ALIASES[_norm(_spec.name)] = _spec.name
    _ALIASES[_norm(_spec.hf_config)] = _spec.name


def task_aliases(spec: TaskSpec) -> set[str]:
    """Normalised spellings of a task (used to find its folder case-insensitively)."""
    return {_norm(spec.name), _norm(spec.hf_config)}


def normalize_name(name: str) -> str:
    return _norm(name)


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Look a task up by any common spelling ("sts-b", "STSB", "sst2", "mnli", ...)."""
    if isinstance(name, TaskSpec):
        return name
    canonical = _ALIASES.get(_norm(str(name)))
    if canonical is None:
        raise DiffpruneError(f"unknown GLUE task '{name}'; choose one of {', '.join(TASKS)}")
    return TASKS[canonical]


# Split names users may type, mapped to the file stem; MNLI's "dev"/"test" mean the matched halves.
_SPLIT_ALIASES = {"validation": "dev", "valid": "dev", "val": "dev",
                  "validation_matched": "dev_matched", "validation_mismatched": "dev_mismatched"}


def resolve_split(task: str | TaskSpec, split: str) -> str:
    """Canonical split (file stem) for `split`, e.g. ("MNLI", "validation") -> "dev_matched"."""
    spec = get_task(task)
    s = str(split).strip().lower()
    s = _SPLIT_ALIASES.get(s, s)
    if s in ("dev", "test") and len(spec.dev_splits) > 1:
        s = f"{s}_matched"
    if s not in spec.splits:
        raise DiffpruneError(
            f"GLUE task {spec.name} has no split '{split}'; choose one of {', '.join(spec.splits)}"
        )
    return s
