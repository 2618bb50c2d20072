"""Named loss terms and metrics, logged one by one to a tidy CSV and to TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

from diffprune.io import atomic_path

COLUMNS = ["step", "phase", "epoch", "name", "value"]


class RunLogger:
    """Only the main process writes. On resume, rows past the checkpoint's step are dropped,
    since the resumed run logs those steps again."""

    def __init__(self, output: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = output / "log.csv"
        self._tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        else:
            kept = []
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            table = csv.DictWriter(f, fieldnames=COLUMNS)
            table.writeheader()
            table.writerows(kept)
        self._file = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at that step and after: keep the checkpoint's own step
            # (and, for a run started again from its first step, none of an earlier try's)
            purge = (resume_step or 0) + 1
            self._tb = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=purge)
        except ImportError:  # tensorboard is a dependency, but the CSV alone is still a full log
            self._tb = None

    def log(self, step: int, phase: str, epoch: float, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._csv.writerow({"step": step, "phase": phase, "epoch": f"{epoch:.4f}", "name": name, "value": value})
            if self._tb is not None:
                self._tb.add_scalar(f"{phase}/{name}", value, step)
        self._file.flush()

    def flush(self) -> None:
        """Put every event so far on disk (at a checkpoint: a run killed later keeps them)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
