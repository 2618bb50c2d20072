"""The task bank: one base loaded once, every task a patch registered from a folder.

Registering reads only a file's header (its meta), so a bank of hundreds of tasks starts at
once; a patch is read whole on first use and kept within a memory bound, the least recently
used leaving first. Patches are added and removed while serving (`rescan`, `add`, `remove`).

The bank refuses, with the reason: a patch made for another base (both fingerprints named), a
file that is not a diffprune patch (a full model, a LoRA adapter), a run folder of a method that
writes no patch, a head this server cannot run, a name that cannot be a task name. Task names
come from the folder's own listing, never from a request: a request's name is only looked up.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffprune.base import BaseModel
from diffprune.errors import DiffpruneError, first_line
from diffprune.patch.model_state import prepared_nbytes
from diffprune.patch.compact import CompactDiffs, CompactPatch
from diffprune.patch.format import VALUE_DTYPES
from diffprune.patch.taskpatch import TaskPatch
from diffprune.serving.heads import head_kind, head_problem
from diffprune.serving.mixed import looked_up, mix_problem
from diffprune.serving.pages import move_to_huge_pages
from diffprune.serving.sparse_tasks import runtime_problem, sparse_task_model

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RUN_PATCH = "patch.safetensors"
DEFAULT_MEMORY_BYTES = 512 * 2**20
DEFAULT_MAX_LENGTH = 128


class UnknownTask(DiffpruneError):
    """No patch of that name is served."""


@dataclass
class Registered:
    """A patch file known by its header only."""

    name: str
    path: Path
    meta: dict
    file_bytes: int
    modified_ns: int = 0

    @property
    def stamp(self) -> tuple:
        """What changes when the file is replaced or rewritten."""
        return self.path, self.file_bytes, self.modified_ns


@dataclass
class LoadedTask:
    """A patch read whole, with what serving needs of it. A patch that can join mixed batches is
    kept in one compact form (CompactPatch: gap-coded positions, the file's value dtype), which
    mixed batches and switching both read; any other is kept as its TaskPatch."""

    name: str
    patch: CompactPatch | TaskPatch  # what switching applies
    head: dict[str, torch.Tensor]  # on the model's device
    meta: dict
    num_outputs: int
    labels: list[str]
    regression: bool
    max_length: int
    mix_problem: str | None  # why it cannot join a mixed batch (None: it can)
    head_kind: str = "model"
    # why it does not run on the sparse runtime (None: it does, with the model made on first use)
    sparse_problem: str | None = "the bank serves no task on the sparse runtime"
    _sparse: tuple[BaseModel, int] | None = field(default=None, repr=False)

    @property
    def has_sparse_model(self) -> bool:
        return self._sparse is not None

    def sparse_model(self, base: BaseModel) -> BaseModel:
        """The task's own model on the sparse runtime (sparse_tasks.py), made on first use."""
        if self._sparse is None:
            self._sparse = sparse_task_model(base, self.patch)
            # never switched from now on: its changes, and what switching prepared for them, can go
            self.patch = TaskPatch({}, self.patch.head, self.patch.meta)
        return self._sparse[0]

    @property
    def diffs(self) -> CompactDiffs | dict:
        return self.patch.diffs

    def nbytes(self) -> int:
        """The bytes of every array and tensor it holds (its head included)."""
        if isinstance(self.patch, CompactPatch):
            total = self.patch.diffs.nbytes
        else:
            total = sum(d.positions.nbytes + d.values.nbytes for d in self.patch.diffs.values())
        heads = {t.data_ptr(): t for t in (*self.head.values(), *self.patch.head.values())}  # each tensor once
        return total + sum(t.nbytes for t in heads.values()) + (self._sparse[1] if self._sparse else 0)


class TaskBank:
    """The tasks served on one base, from the patch files in `folder`."""

    def __init__(self, base: BaseModel, folder: str | Path, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 sparse_runtime: bool = False) -> None:
        self.base, self.folder = base, Path(folder).resolve()
        self.sparse_runtime = sparse_runtime  # pruning patches run on their own sparse models
        if not self.folder.is_dir():
            raise DiffpruneError(f"patch folder '{folder}' does not exist")
        self.memory_bytes = memory_bytes
        base.model.eval()
        for p in base.model.parameters():
            p.requires_grad_(False)
        move_to_huge_pages(base.model)  # switching writes at random places in it (pages.py)
        self._modules = dict(base.model.named_modules())
        self._lock = threading.RLock()
        self._registered: dict[str, Registered] = {}
        self._loaded: OrderedDict[str, LoadedTask] = OrderedDict()
        self.refused: dict[str, str] = {}  # file or folder name -> why it is not served
        self.rescan()

    # -- the set of tasks ----------------------------------------------------------------------
    def rescan(self) -> dict:
        """Register the folder's patches anew: new files added, vanished ones removed."""
        found, refused = {}, {}
        for entry in sorted(self.folder.iterdir()):
            try:
                registered = self._candidate(entry)
            except DiffpruneError as e:
                refused[entry.name] = str(e)
                continue
            if registered is not None and registered.name in found:
                taken = found[registered.name].path
                where = taken.relative_to(self.folder) if taken.is_relative_to(self.folder) else taken
                refused[entry.name] = f"task name '{registered.name}' is taken by {where}"
            elif registered is not None:
                found[registered.name] = registered
        with self._lock:
            before = set(self._registered)
            for name in before - set(found):
                self._loaded.pop(name, None)
            for name, reg in found.items():
                old = self._registered.get(name)
                if old is not None and old.stamp != reg.stamp:
                    self._loaded.pop(name, None)  # the file changed: read it again on next use
            self._registered, self.refused = found, refused
        return {"added": sorted(set(found) - before), "removed": sorted(before - set(found)), "refused": refused}

    def add(self, path: str | Path, name: str | None = None) -> str:
        """Register one patch file under `name` (default: its file name without .safetensors)."""
        path = Path(path)
        reg = self._register(path, name or path.stem)
        with self._lock:
            self._loaded.pop(reg.name, None)
            self._registered[reg.name] = reg
        return reg.name

    def remove(self, name: str) -> None:
        with self._lock:
            if self._registered.pop(name, None) is None:
                raise UnknownTask(f"no task '{name}' is served")
            self._loaded.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._registered)

    def describe(self, name: str) -> dict:
        with self._lock:
            reg = self._lookup(name)
            loaded = self._loaded.get(name)
        meta = reg.meta
        info = {"name": name, "task": meta.get("task"), "method": meta.get("method"),
                "labels": meta.get("labels"), "num_labels": meta.get("num_labels"),
                "problem_type": meta.get("problem_type"), "head": meta.get("head") or "model", "file_bytes": reg.file_bytes,
                "loaded": loaded is not None}
        if loaded is not None and loaded.sparse_problem is None:
            info["served_by"] = "the sparse runtime"
        elif loaded is not None:
            info["served_by"] = "switching" if loaded.mix_problem else "mixed batches or switching"
            if loaded.mix_problem:
                info["why_switching"] = loaded.mix_problem
        return info

    # -- patches in memory ---------------------------------------------------------------------
    def get(self, name: str) -> LoadedTask:
        """The task, read on first use; the least recently used leave beyond the memory bound."""
        with self._lock:
            reg = self._lookup(name)
            task = self._loaded.get(name)
            if task is not None:
                self._loaded.move_to_end(name)
                return task
        task = self._load(reg)  # outside the lock: requests for loaded tasks go on meanwhile
        with self._lock:
            if self._registered.get(name) is reg:
                self._loaded[name] = task
                self._loaded.move_to_end(name)
                self._evict(keep=name)
        return task

    def sparse_model(self, task: LoadedTask) -> BaseModel:
        """The task's model on the sparse runtime, made on first use; the memory bound then
        counts it (the least recently used other tasks leave if it needs their room)."""
        made = task.has_sparse_model
        model = task.sparse_model(self.base)
        if not made:
            with self._lock:
                self._evict(keep=task.name)
        return model

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def loaded_bytes(self) -> int:
        """Memory the loaded patches hold: positions, values, heads, and what switching prepared."""
        with self._lock:
            tasks = list(self._loaded.values())
        return sum(self.task_bytes(t) for t in tasks)

    def task_bytes(self, task: LoadedTask) -> int:
        return task.nbytes() + prepared_nbytes(task.patch, self.base.model)

    def _evict(self, keep: str) -> None:
        total = sum(self.task_bytes(t) for t in self._loaded.values())
        for name in list(self._loaded):
            if total <= self.memory_bytes:
                break
            if name != keep:
                total -= self.task_bytes(self._loaded.pop(name))

    def _lookup(self, name: str) -> Registered:
        reg = self._registered.get(name) if isinstance(name, str) else None
        if reg is None:
            raise UnknownTask(f"no task '{name}' is served")
        return reg

    # -- reading files -------------------------------------------------------------------------
    def _candidate(self, entry: Path) -> Registered | None:
        """The patch an entry of the folder holds: NAME.safetensors, or a run folder NAME/ with
        patch.safetensors. Anything else is skipped (None) or refused (a reason)."""
        if entry.name.startswith("."):
            return None
        if entry.is_dir():
            if (entry / RUN_PATCH).is_file():
                return self._register(entry / RUN_PATCH, entry.name)
            run = entry / "run.json"
            if run.is_file():
                method = _run_method(run)
                raise DiffpruneError(f"run folder of method '{method}', which writes no patch "
                                     "(a full model or an adapter, not a sparse change to the base)")
            return None
        if entry.suffix == ".safetensors":
            return self._register(entry, entry.stem)
        return None

    def _register(self, path: Path, name: str) -> Registered:
        if not NAME.fullmatch(name):
            raise DiffpruneError(f"'{name}' cannot be a task name (letters, digits, '_', '.', '-'; 64 at most)")
        resolved = path.resolve()
        if not resolved.is_file():
            raise DiffpruneError(f"patch file '{path}' does not exist")
        meta = _read_meta(resolved)
        if meta["fingerprint"] != self.base.fingerprint:
            raise DiffpruneError(f"made for base {meta['fingerprint']}, but the served base "
                                 f"'{self.base.name}' is {self.base.fingerprint}")
        head_kind(meta)
        stat = resolved.stat()
        return Registered(name, resolved, meta, stat.st_size, stat.st_mtime_ns)

    def _load(self, reg: Registered) -> LoadedTask:
        patch = TaskPatch.load(reg.path)
        if patch.meta["fingerprint"] != self.base.fingerprint:  # the file was replaced since
            raise DiffpruneError(f"task '{reg.name}': made for base {patch.meta['fingerprint']}, but the served "
                                 f"base is {self.base.fingerprint}")
        kind = head_kind(patch.meta)
        problem = head_problem(patch.head, self.base, kind)
        if problem:
            raise DiffpruneError(f"task '{reg.name}' cannot be served: {problem}")
        meta = patch.meta
        regression = meta.get("problem_type") == "regression"
        num = 1 if regression else int(meta.get("num_labels") or len(meta.get("labels") or []) or 0)
        if num < 1:
            raise DiffpruneError(f"task '{reg.name}' cannot be served: its meta names no num_labels")
        labels = list(meta.get("labels") or []) if len(meta.get("labels") or []) == num else [str(i) for i in range(num)]
        device = next(self.base.model.parameters()).device
        head = {n: t.to(device) for n, t in patch.head.items()}
        limit = self.base.max_positions() or DEFAULT_MAX_LENGTH
        length = min(int(meta.get("max_seq_length") or DEFAULT_MAX_LENGTH), limit)
        mixing = mix_problem({n: d.kind for n, d in patch.diffs.items()}, self._modules)
        if mixing is None:
            dtype = VALUE_DTYPES.get(patch._value_dtype or "float32", torch.float32)
            diffs = CompactDiffs.of(patch.diffs, dtype, looked_up(patch.diffs, self._modules))
            patch = CompactPatch(diffs, head, meta, reg.name)
        task = LoadedTask(reg.name, patch, head, meta, num, labels, regression, length, mixing, kind)
        if self.sparse_runtime and mixing is not None:
            task.sparse_problem = runtime_problem(patch, self._modules)
        return task


def _read_meta(path: Path) -> dict:
    """A patch file's meta from its header alone; a file that is no diffprune patch is refused."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise DiffpruneError(f"'{path.name}' is not a safetensors file: {first_line(e)}") from e
    if header.get("format") != "diffprune.patch":
        raise DiffpruneError(f"'{path.name}' is not a diffprune patch (a full model or a LoRA adapter is "
                             "served by its own library, not as a sparse change to the base)")
    try:
        meta = json.loads(header.get("meta", ""))
    except json.JSONDecodeError as e:
        raise DiffpruneError(f"'{path.name}' has unreadable meta: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint"), str):
        raise DiffpruneError(f"'{path.name}' names no base fingerprint")
    return meta


def _run_method(run: Path) -> str:
    try:
        return str(json.loads(run.read_text()).get("method", "?"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return "?"
