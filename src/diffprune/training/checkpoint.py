"""Resumable checkpoints and the guard that keeps one run from overwriting another.

A checkpoint is a folder `checkpoints/step-N` holding the method's trainable state
(safetensors), the optimiser, scheduler and RNG state (torch.save, loaded weights_only), the
best-so-far snapshot and the loop's progress (JSON). It is written under a temporary name and
renamed into place, and `checkpoints/latest` is replaced atomically, so a run killed at any
moment (SIGKILL included) leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffprune.errors import DiffpruneError, first_line
from diffprune.io import atomic_dir, write_json, write_text

# What a finished or interrupted run leaves behind; any of these makes a folder "used".
RUN_MARKERS = ("run.json", "settings.json", "checkpoints")


@dataclass
class Progress:
    phase: int = 0  # index of the phase in progress
    phase_step: int = 0  # optimiser steps done in that phase
    global_step: int = 0
    best_score: float | None = None
    best_step: int | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)  # every dev evaluation so far
    seconds: float = 0.0  # training time spent before this checkpoint (for the record's wall time)
    # ... and the CPU time this process's threads spent in it: what the run cost, which pauses
    # (a stopped process) and a busy machine do not inflate as they do the wall time
    cpu_seconds: float = 0.0

    def clock(self) -> tuple[float, float]:
        """The wall and CPU clocks' readings at which training would have started had it never
        stopped (for tick)."""
        return time.perf_counter() - self.seconds, time.process_time() - self.cpu_seconds

    def tick(self, clock: tuple[float, float]) -> None:
        """The training time so far, from a clock() taken when this process took up the run."""
        self.seconds, self.cpu_seconds = time.perf_counter() - clock[0], time.process_time() - clock[1]


def prepare_output(output: Path, *, overwrite: bool, resume: bool, artifacts: Iterable[str] = ()) -> None:
    """Refuse to mix runs in one folder unless the user said which way to go. `--overwrite`
    also clears `artifacts` (what a method saves), so no old patch or model outlives its run. A
    folder that holds no run is never cleared, and one that already has an artifact's name in
    it (a `model/` of the user's) is refused."""
    check_writable(output)
    used = [m for m in RUN_MARKERS if (output / m).exists()]
    if resume:
        if not latest_checkpoint(output) and not (output / "settings.json").exists():
            raise DiffpruneError(f"--resume: {output} holds no run to resume")
        return
    if used and not overwrite:
        raise DiffpruneError(f"{output} already holds a run ({used[0]}); pass --overwrite to replace it or --resume to continue it")
    foreign = [a for a in artifacts if (output / a).exists()]
    if not used and foreign:  # not a run's: the user's own (a base model in `model/`, say), never to be replaced
        raise DiffpruneError(f"{output} holds no run but has a '{foreign[0]}' where a run writes its "
                             "artifact; choose another --output")
    with writing_into(output):
        if used:  # a run, and --overwrite (refused above without it)
            for m in (*RUN_MARKERS, "log.csv", "tensorboard", "best.safetensors", *artifacts):
                path = output / m
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        output.mkdir(parents=True, exist_ok=True)
    check_writable(output)  # the folder itself now: it may exist read-only in a writable parent


def check_writable(output: Path) -> None:
    """Refuse an output the run could not write, before anything is loaded: a file, a read-only
    folder or file system, a full disk. Probed on the folder, or on its nearest existing parent
    when it is not made yet, by writing (and removing) a small file: permissions alone do not
    show a read-only mount to root, nor a full disk to anyone."""
    if output.exists() and not output.is_dir():
        raise DiffpruneError(f"--output {output} is a file, not a folder")
    folder = output
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise DiffpruneError(f"--output {output} cannot be made: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".diffprune-probe-", dir=folder)
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)  # a full disk may accept the write and refuse only the flush
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise DiffpruneError(f"--output {output} cannot be written: {_reason(e)} ({folder})") from None


@contextmanager
def writing_into(output: Path) -> Iterator[None]:
    """Turn a failed write into the run folder (read-only, disk full) into a one-line error.
    safetensors reports such failures as SafetensorError, whose text holds the OS reason."""
    try:
        yield
    except SafetensorError as e:
        raise DiffpruneError(f"cannot write into {output}: {_safetensors_reason(e)}") from None
    except OSError as e:
        where = e.filename if e.filename is not None else output
        raise DiffpruneError(f"cannot write {where}: {_reason(e)}") from None


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return e.strerror or first_line(e)


def _safetensors_reason(e: SafetensorError) -> str:
    """The OS reason inside safetensors' text (`IoError(Os { code: 28, ... })`), if it holds one."""
    code = re.search(r"\bcode: (\d+)", str(e))
    return _reason(OSError(int(code[1]), os.strerror(int(code[1])))) if code else first_line(e)


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding an inf or NaN, if any."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def latest_checkpoint(output: Path) -> Path | None:
    pointer = output / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = output / "checkpoints" / pointer.read_text().strip()
    if not (path / "progress.json").exists():
        raise DiffpruneError(f"checkpoint {path} named by {pointer} is missing or incomplete")
    return path


def save_checkpoint(
    output: Path,
    progress: Progress,
    trainable: dict[str, torch.Tensor],
    best: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng_per_process: list[dict[str, Any]] | None = None,
    scaler: Any = None,
) -> Path:
    """Write a checkpoint (on the main process). `rng_per_process`: every process's RNG state
    (see `rng_state`), gathered, since each process draws its own dropout and gate noise.
    `scaler`: fp16's gradient scaler, whose loss scale decides which steps are skipped."""
    root = output / "checkpoints"
    name = f"step-{progress.global_step}"
    with writing_into(output), atomic_dir(root / name) as tmp:
        save_file(_contiguous(trainable), tmp / "trainable.safetensors")
        if best is not None:
            save_file(_contiguous(best), tmp / "best.safetensors")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_per_process": rng_per_process or [rng_state()],
                **({"scaler": scaler.state_dict()} if scaler is not None else {}),
            },
            tmp / "state.pt",
        )
        (tmp / "progress.json").write_text(json.dumps(asdict(progress)))
    with writing_into(output):
        write_text(root / "latest", name)
    for old in root.iterdir():  # only the newest is needed to resume (and a killed write leaves a .tmp)
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


@dataclass
class Checkpoint:
    path: Path
    progress: Progress
    trainable: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    state: dict[str, Any]

    def restore_rng(self, process_index: int = 0) -> None:
        """Restore this process's RNG state (the main one's if the run had fewer processes)."""
        states = self.state.get("rng_per_process")
        if states is None:  # older checkpoints kept the main process's state only
            states = [{"cpu": self.state["rng"], "cuda": self.state["cuda_rng"]}]
        mine = states[process_index] if process_index < len(states) else states[0]
        torch.set_rng_state(mine["cpu"])
        cuda = mine["cuda"]
        if cuda and torch.cuda.is_available():
            # One state, this process's device's; checkpoints before that held one per visible
            # device, of which this process's device's is the one it draws from.
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])


def rng_state() -> dict[str, Any]:
    """This process's CPU and current-GPU generator states. Only its own device's: a run may
    resume on a machine with fewer GPUs, where restoring every device's state would fail."""
    return {"cpu": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else []}


def load_checkpoint(path: Path) -> Checkpoint:
    try:
        progress = Progress(**json.loads((path / "progress.json").read_text()))
        trainable = load_file(path / "trainable.safetensors")
        best = load_file(path / "best.safetensors") if (path / "best.safetensors").exists() else None
        state = torch.load(path / "state.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError, TypeError, EOFError, SafetensorError, pickle.UnpicklingError) as e:
        raise DiffpruneError(f"checkpoint {path} is unreadable: {first_line(e)}") from e
    return Checkpoint(path, progress, trainable, best, state)


def save_settings(output: Path, settings: dict[str, Any]) -> None:
    with writing_into(output):
        write_json(output / "settings.json", settings)


def check_resumable(output: Path, computation: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """A resumed run must compute the same thing as the run it continues.

    `defaults` holds settings' default values (for a dict setting, such as the method's
    options, one default per key). A setting the saved run does not name was added to
    diffprune after that run was made; new settings default to the old behaviour, so the saved
    run counts as having used the default, and resuming it with the default is allowed."""
    saved = json.loads((output / "settings.json").read_text())
    for k, default in (defaults or {}).items():
        if k not in saved:
            saved[k] = default
        elif isinstance(default, dict) and isinstance(saved[k], dict):
            saved[k] = {**default, **saved[k]}
    changed = sorted(k for k in computation if saved.get(k) != computation[k])
    if changed:
        k = changed[0]
        raise DiffpruneError(
            f"--resume: setting '{k}' is {computation[k]!r} but the run in {output} used {saved.get(k)!r}"
        )


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
