"""Read GLUE splits (from a GLUE folder or the HF hub) and turn them into model inputs."""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from diffprune.errors import DiffpruneError
from diffprune.glue.tasks import TaskSpec, get_task, normalize_name, resolve_split, task_aliases

log = logging.getLogger(__name__)


@dataclass
class Example:
    idx: int  # `index`/`id` column of test files (the submission id); row number for train/dev
    texts: tuple[str, ...]
    label: int | float | None  # index into spec.labels, a float for STS-B, None when unlabeled


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The GLUE folder to read: `data_dir`, else $GLUE_DIR, else None (load from the HF hub)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("GLUE_DIR", "")
    return Path(env).expanduser() if env else None


def _task_dir(spec: TaskSpec, data_dir: Path) -> Path:
    if not data_dir.exists():
        raise DiffpruneError(f"GLUE folder {data_dir} does not exist")
    if not data_dir.is_dir():
        raise DiffpruneError(f"GLUE folder {data_dir} is a file, not a folder")
    # Folders are named "STS-B" by download_glue_data.py but "STSB"/"stsb" by other tools.
    wanted = task_aliases(spec)
    matches = sorted(p for p in data_dir.iterdir() if p.is_dir() and normalize_name(p.name) in wanted)
    exact = [p for p in matches if p.name == spec.name]
    if exact or matches:
        return (exact or matches)[0]
    raise DiffpruneError(
        f"GLUE folder {data_dir} has no {spec.name}/ (expected {data_dir / spec.name / 'train.tsv'})"
    )


def _parse_label(spec: TaskSpec, raw: str, where: str) -> int | float:
    value = raw.strip()
    if spec.is_regression:
        try:
            score = float(value)
        except ValueError:
            raise DiffpruneError(f"{where}: unparseable score '{raw}' (expected a number in [0, 5])") from None
        if not (math.isfinite(score) and 0.0 <= score <= 5.0):
            raise DiffpruneError(f"{where}: score {raw} is outside [0, 5]")
        return score
    assert spec.labels is not None
    if value not in spec.labels:
        raise DiffpruneError(
            f"{where}: label '{raw}' is not one of {{{', '.join(spec.labels)}}} for {spec.name}"
        )
    return spec.labels.index(value)


def _parse_idx(raw: str, where: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise DiffpruneError(f"{where}: id '{raw}' is not an integer") from None


def read_glue_split(task: str | TaskSpec, split: str, data_dir: str | os.PathLike) -> list[Example]:
    """Read `<data_dir>/<TASK>/<split>.tsv` in the official GLUE layout."""
    spec = get_task(task)
    split = resolve_split(spec, split)
    path = _task_dir(spec, Path(data_dir).expanduser()) / f"{split}.tsv"
    if not path.is_file():
        raise DiffpruneError(f"GLUE split file {path} does not exist")
    is_test = split in spec.test_splits
    try:
        # QUOTE_NONE: GLUE text contains unbalanced `"`; utf-8-sig strips MRPC's byte-order mark.
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            try:
                return _read_rows(spec, path, reader, is_test)
            except csv.Error as e:  # e.g. a NUL byte or a field over csv's 128 KiB limit
                raise DiffpruneError(f"{path}:{reader.line_num}: {e}") from None
    except UnicodeDecodeError as e:
        raise DiffpruneError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _read_rows(spec: TaskSpec, path: Path, reader: Any, is_test: bool) -> list[Example]:
    headerless = spec.label_column is None and not is_test  # CoLA train/dev
    if headerless:
        # [source, label, label_notes, sentence]
        width, text_pos, label_pos, idx_pos = 4, (3,), 1, None
    else:
        header = next(reader, None)
        if header is None:
            raise DiffpruneError(f"{path}: file is empty (expected a header line)")
        header = [h.strip() for h in header]
        wanted = list(spec.text_columns) + ([] if is_test else [spec.label_column])
        if is_test:
            wanted.append("id" if "id" in header else "index")  # QQP's test file says `id`
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DiffpruneError(
                f"{path}:1: missing column(s) {', '.join(missing)} (header has {', '.join(header)})"
            )
        width = len(header)
        text_pos = tuple(header.index(c) for c in spec.text_columns)
        label_pos = None if is_test else header.index(spec.label_column)
        idx_pos = header.index(wanted[-1]) if is_test else None

    examples: list[Example] = []
    skipped = 0
    for row in reader:
        if not row:  # a blank line (e.g. an extra newline at the end) carries no example
            continue
        where = f"{path}:{reader.line_num}"
        if len(row) != width:
            # The real QQP train file has rows that lost fields; HF's processor skipped them too.
            # Never in a test file: a submission lacking a row is refused by the GLUE server.
            if spec.name == "QQP" and len(row) < width and not is_test:
                skipped += 1
                continue
            raise DiffpruneError(f"{where}: expected {width} tab-separated fields, found {len(row)}")
        texts = tuple(row[i] for i in text_pos)
        if is_test:
            examples.append(Example(_parse_idx(row[idx_pos], where), texts, None))
        else:
            examples.append(Example(len(examples), texts, _parse_label(spec, row[label_pos], where)))
    if skipped:
        log.warning("%s: skipped %d row(s) with missing fields", path, skipped)
    return examples


_HF_SPLITS = {"dev": "validation", "dev_matched": "validation_matched",
              "dev_mismatched": "validation_mismatched"}


def examples_from_hf(spec: str | TaskSpec, hf_dataset: Any, has_labels: bool = True) -> list[Example]:
    """Convert a `nyu-mll/glue` dataset (columns: texts, label, idx) into Examples."""
    spec = get_task(spec)
    columns = list(spec.hf_text_columns) + ["label", "idx"]
    missing = [c for c in columns if c not in hf_dataset.column_names]
    if missing:
        raise DiffpruneError(
            f"HF dataset for {spec.name} lacks column(s) {', '.join(missing)} "
            f"(has {', '.join(hf_dataset.column_names)})"
        )
    texts = list(zip(*(list(hf_dataset[c]) for c in spec.hf_text_columns)))
    idxs = [int(i) for i in hf_dataset["idx"]]
    if not has_labels:  # HF test splits carry label -1
        return [Example(i, t, None) for i, t in zip(idxs, texts)]
    examples = []
    for i, t, raw in zip(idxs, texts, hf_dataset["label"]):
        if spec.is_regression:
            label: int | float = float(raw)
            ok = math.isfinite(label) and 0.0 <= label <= 5.0
        else:
            label = int(raw)
            ok = 0 <= label < spec.num_labels
        if not ok:
            raise DiffpruneError(
                f"HF dataset for {spec.name}: example idx {i} has label {raw}, "
                f"outside the task's range (is this an unlabeled test split?)"
            )
        examples.append(Example(i, t, label))
    return examples


def load_hub_split(task: str | TaskSpec, split: str) -> list[Example]:
    """Load a split of `nyu-mll/glue` with `datasets` (needs the network or an HF cache)."""
    spec = get_task(task)
    split = resolve_split(spec, split)
    hf_split = _HF_SPLITS.get(split, split)
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", spec.hf_config, split=hf_split)
    except Exception as e:  # network, auth, missing cache: all mean "use a local folder instead"
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise DiffpruneError(
            f"could not load GLUE task {spec.name} from the Hugging Face hub ({reason}); "
            f"pass --data-dir or set GLUE_DIR to a GLUE folder"
        ) from None
    return examples_from_hf(spec, ds, has_labels=split not in spec.test_splits)


def load_split(task: str | TaskSpec, split: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """Read from the GLUE folder if one is given (argument or $GLUE_DIR), else from the hub."""
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        return read_glue_split(task, split, folder)
    return load_hub_split(task, split)


class TokenizedDataset(torch.utils.data.Dataset):
    """Examples tokenized once up front; padding is left to the collator (per batch)."""

    _CHUNK = 4096  # tokenizer calls are batched, but not one giant call for MNLI's 393k pairs

    def __init__(self, examples: Sequence[Example], tokenizer: Any, max_length: int = 128):
        self.examples = list(examples)
        self.max_length = max_length
        widths = {len(e.texts) for e in self.examples}
        if len(widths) > 1:
            raise DiffpruneError(f"examples mix {sorted(widths)} texts each; a dataset needs one shape")
        # A float anywhere means a regression task: then every label must become float, since
        # the collator picks the tensor dtype from the python type (an int score 3 -> int64).
        self._float_labels = any(isinstance(e.label, float) for e in self.examples)
        self.encodings: dict[str, list[list[int]]] = {}
        for start in range(0, len(self.examples), self._CHUNK):
            chunk = self.examples[start : start + self._CHUNK]
            columns = [list(col) for col in zip(*(e.texts for e in chunk))]
            enc = tokenizer(*columns, truncation=True, max_length=max_length, padding=False)
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in enc:
                    self.encodings.setdefault(key, []).extend(enc[key])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {k: v[i] for k, v in self.encodings.items()}
        label = self.examples[i].label
        if label is not None:
            item["labels"] = float(label) if self._float_labels else int(label)
        return item


def make_collator(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Dynamic padding; `labels` become float32 for STS-B scores and int64 for class ids."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer=tokenizer, return_tensors="pt")
