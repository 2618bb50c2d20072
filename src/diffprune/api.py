"""The public Python API: train, evaluate and predict. The CLI is a thin layer over these."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, parse_flag_from_env, set_seed
from torch import nn

from diffprune import __version__
from diffprune.base import BaseModel, load_base
from diffprune.errors import DiffpruneError, DiffpruneWarning
from diffprune.glue import (
    TaskSpec,
    TokenizedDataset,
    compute_metrics,
    get_task,
    load_split,
    majority_class_metrics,
    make_collator,
    predictions_from_logits,
    resolve_data_dir,
    resolve_split,
    submission_path,
    write_submission,
)
from diffprune.heads import MODEL_HEAD, start_from_labels
from diffprune.io import write_json
from diffprune.methods import build_method
from diffprune.methods.artifact import PATCH_FILE
from diffprune.methods.registry import artifact_names
from diffprune.training.checkpoint import (
    check_resumable,
    check_writable,
    latest_checkpoint,
    load_checkpoint,
    prepare_output,
    save_settings,
    writing_into,
)
from diffprune.training.logger import RunLogger
from diffprune.training.loop import LoopContext, predict_logits, run_phases
from diffprune.training.phases import Phase
from diffprune.training.settings import TrainSettings


@dataclass
class TaskData:
    spec: TaskSpec
    train: TokenizedDataset | None
    dev: dict[str, TokenizedDataset]


def load_task_data(spec: TaskSpec, base: BaseModel, settings: TrainSettings, with_train: bool = True) -> TaskData:
    def tokenized(split: str, limit: int | None) -> TokenizedDataset:
        examples = load_split(spec, split, settings.data_dir)
        return TokenizedDataset(examples[:limit] if limit else examples, base.tokenizer, settings.max_seq_length)

    longest = base.max_positions()
    if longest is not None and settings.max_seq_length > longest:
        raise DiffpruneError(f"--max-seq-length {settings.max_seq_length} is longer than the {longest} tokens "
                             f"this model takes")
    train = tokenized("train", settings.max_train_samples) if with_train else None
    if train is not None and len(train) == 0:
        raise DiffpruneError(f"the {spec.name} training set is empty")
    dev = {split: tokenized(split, settings.max_eval_samples) for split in spec.dev_splits}
    empty = [split for split, data in dev.items() if len(data) == 0]
    if empty:
        raise DiffpruneError(f"the {spec.name} {empty[0]} set is empty: there is nothing to evaluate on")
    return TaskData(spec, train, dev)


def dev_metrics(model, data: TaskData, collator, accelerator: Accelerator, batch_size: int) -> dict[str, float]:
    """Metrics of every dev split; the first split's are unprefixed and give "score"."""
    result: dict[str, float] = {}
    for i, (split, dataset) in enumerate(data.dev.items()):
        logits = predict_logits(model, dataset, collator, accelerator, batch_size)
        labels = [e.label for e in dataset.examples]
        metrics = compute_metrics(data.spec, predictions_from_logits(data.spec, logits), labels)
        result.update(metrics if i == 0 else {f"{split}_{k}": v for k, v in metrics.items()})
    return result


def majority_class(data: TaskData) -> dict[str, float]:
    """What answering every dev example with the most frequent label scores, keyed as dev_metrics."""
    result: dict[str, float] = {}
    for i, (split, dataset) in enumerate(data.dev.items()):
        metrics = majority_class_metrics(data.spec, [e.label for e in dataset.examples])
        result.update(metrics if i == 0 else {f"{split}_{k}": v for k, v in metrics.items()})
    return result


def train(settings: TrainSettings, method_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one task with one method; returns the run record (also written to OUTPUT/run.json)."""
    if not settings.output:
        raise DiffpruneError("--output is required: the folder for everything the run writes")
    output = Path(settings.output)
    spec = get_task(settings.task)
    method = _method_for(settings, method_options)
    check_writable(output)  # a read-only or full output is refused now, not after minutes of loading
    computation = {**settings.computation(), "method_options": _jsonable_options(method.config)}
    # A run made before an option of this version existed used its default (check_resumable).
    defaults = {**TrainSettings.computation_defaults(), "method_options": _jsonable_options(type(method.config)())}
    started = time.perf_counter()
    set_seed(settings.seed)  # before the model loads: the fresh head's init depends on it
    base = load_base(settings.model, spec.num_labels, labels=spec.labels, regression=spec.is_regression,
                     head=settings.head)
    data = load_task_data(spec, base, settings)
    start_from_labels(base.model, [e.label for e in data.train.examples], spec.is_regression)
    model = method.prepare(base)
    phases = method.phases(model, base, settings)
    # Claimed only now, so that a bad model, data path or method setting leaves the folder as it was.
    _prepare_run_folder(output, settings, computation, defaults)
    # A later phase may train fewer parameters than DDP saw at wrap time. No buffer broadcast on
    # each forward: the models' buffers are constants or updated alike on every process (the
    # lookahead's logit average alone would be 91 MB per step on MiniLM).
    ddp = DistributedDataParallelKwargs(find_unused_parameters=len(phases) > 1, broadcast_buffers=False)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision, cpu=_cpu_only(), kwargs_handlers=[ddp])
    wrapped = _prepare_for_every_phase(accelerator, model, phases)
    collator = make_collator(base.tokenizer)

    checkpoint_path = latest_checkpoint(output) if settings.resume else None
    resume = load_checkpoint(checkpoint_path) if checkpoint_path else None
    with writing_into(output):
        logger = RunLogger(output, accelerator.is_main_process, resume.progress.global_step if resume else None)
    ctx = LoopContext(
        accelerator=accelerator,
        model=wrapped,
        train_set=data.train,
        collator=collator,
        evaluate=lambda: dev_metrics(wrapped, data, collator, accelerator, settings.eval_batch_size),
        trainable_state=lambda: method.trainable_state(model),
        load_trainable_state=lambda state: method.load_trainable_state(model, state),
        output=output,
        logger=logger,
        seed=settings.seed,
        batch_size=settings.batch_size,
        max_grad_norm=settings.max_grad_norm,
        checkpoint_every=settings.checkpoint_every,
        log_every=settings.log_every,
        lengths=[len(example["input_ids"]) for example in data.train] if settings.group_by_length else None,
    )
    try:
        with writing_into(output):  # the log and the checkpoints, written as the run goes
            progress = run_phases(ctx, phases, resume)
    finally:
        logger.close()

    method.finish(model)
    final = dev_metrics(wrapped, data, collator, accelerator, settings.eval_batch_size)
    record = _run_record(settings, spec, method, model, base, data, final, progress, accelerator, started)
    with writing_into(output):
        if accelerator.is_main_process and settings.save_model:
            record["files"] = method.save(model, base, output, record)
        record.update(method.record_extras(model, base))  # after save: it may report the artifact's size
        if accelerator.is_main_process:
            write_json(output / "run.json", record)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return record


def _method_for(settings: TrainSettings, method_options: dict[str, Any] | None):
    """The method the settings name, refused now where it cannot run as asked."""
    method = build_method(settings.method, method_options)
    if method.fsdp_refused and parse_flag_from_env("ACCELERATE_USE_FSDP"):  # set by `accelerate launch`
        raise DiffpruneError(f"method '{method.name}' cannot train under FSDP: {method.fsdp_refused}")
    if settings.head != MODEL_HEAD and method.artifact != PATCH_FILE:
        raise DiffpruneError(f"--head {settings.head} needs a method whose result is a patch: '{method.name}' saves "
                             f"a transformers {method.artifact}, which has no place for that head")
    return method


def _run_record(settings, spec, method, model, base, data, final, progress, accelerator, started) -> dict[str, Any]:
    return {
        "diffprune_version": __version__,
        "model": base.name,
        "fingerprint": base.fingerprint,
        "task": spec.name,
        "method": method.name,
        "method_options": _jsonable_options(method.config),
        "settings": settings.to_dict(),
        "lr": method.lr(settings),  # the main rate the run used: --lr, else the method's default
        "metric": spec.main_metric,
        "score": final["score"],
        "dev": final,
        "majority_class": majority_class(data),
        "evals": progress.evals,
        "trainable_params": method.trainable_params(model),
        "base_params": base.num_base_params,
        "train_examples": len(data.train),
        "data_dir": _data_folder(settings.data_dir),
        "steps": progress.global_step,
        "seconds": round(progress.seconds, 2),
        "cpu_seconds": round(progress.cpu_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": peak_rss_mb(),
        "device": device_name(accelerator),
        "num_processes": accelerator.num_processes,
    }


def _data_folder(data_dir: str | None) -> str | None:
    """The GLUE folder a run reads, made absolute so that `eval --run` finds it from anywhere;
    None when the data came from the hub."""
    folder = resolve_data_dir(data_dir)
    return str(folder.resolve()) if folder is not None else None


def _prepare_for_every_phase(accelerator: Accelerator, model: nn.Module, phases: list[Phase]) -> nn.Module:
    """Wrap the model (DDP when distributed) so that it synchronises what any phase trains.

    DDP registers only the parameters that require gradients when it wraps the model; those a
    later phase unfreezes (diff pruning's k values) would otherwise train apart on each process.
    """
    later = [p for phase in phases for group in phase.param_groups() for p in group.params]
    frozen = [p for p in later if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        return accelerator.prepare_model(model)
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _prepare_run_folder(output: Path, settings: TrainSettings, computation: dict[str, Any],
                        defaults: dict[str, Any]) -> None:
    """Check, clear and claim the output folder on the main process only, then share the verdict.

    Launched distributed, every process runs `train`; were each to check the folder, the later
    ones would find the first one's settings.json and refuse the folder as already used.
    """
    state = PartialState(cpu=_cpu_only())  # the state the Accelerator made later will share
    verdict: list[str | None] = [None]
    if state.is_main_process:
        try:
            prepare_output(output, overwrite=settings.overwrite, resume=settings.resume, artifacts=artifact_names())
            if settings.resume and (output / "settings.json").exists():
                check_resumable(output, computation, defaults)
            save_settings(output, computation)
        except DiffpruneError as e:
            verdict[0] = str(e)
    broadcast_object_list(verdict)  # also the barrier: no process reads the folder before it is ready
    if verdict[0] is not None:
        raise DiffpruneError(verdict[0])


def _cpu_only() -> bool:
    """Whether Accelerate must be told to use the CPU.

    Accelerate forms a CPU process group (gloo) only when told to use the CPU; launched with
    torchrun on a machine without an accelerator it would otherwise run every process as a
    separate single-process run, each writing the same output folder.
    """
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return launched and not torch.accelerator.is_available()


def load_run(run_dir: str | Path, data_dir: str | None, batch_size: int):
    """Rebuild a finished run's model from its folder, ready to evaluate or predict."""
    run = Path(run_dir) if run_dir else None
    if run is None or not (run / "run.json").exists():
        raise DiffpruneError(f"{run} is not a finished run folder (no run.json); pass --run DIR")
    saved = json.loads((run / "settings.json").read_text())
    settings = TrainSettings(**{k: v for k, v in saved.items() if k in TrainSettings.__dataclass_fields__})
    settings.data_dir, settings.eval_batch_size = data_dir or _recorded_data_dir(run), batch_size
    spec = get_task(settings.task)
    method = build_method(settings.method, saved.get("method_options"))
    if not (run / method.artifact).exists():
        raise DiffpruneError(f"{run} holds no {method.artifact} to evaluate (was it trained with --no-save-model?)")
    base = load_base(settings.model, spec.num_labels, labels=spec.labels, regression=spec.is_regression,
                     head=settings.head)
    model = method.load_artifact(base, run)
    return settings, spec, base, model


def _recorded_data_dir(run: Path) -> str | None:
    """The GLUE folder the run read (None: the hub), so that evaluating it needs no --data-dir
    and never waits for the hub offline. Runs made before it was recorded name it as given."""
    record = json.loads((run / "run.json").read_text())
    folder = record["data_dir"] if "data_dir" in record else record.get("settings", {}).get("data_dir")
    if folder and not Path(folder).is_dir():
        raise DiffpruneError(f"the run read its data from {folder}, which is no longer there; pass --data-dir")
    return folder


def evaluate_run(run_dir: str | Path, data_dir: str | None = None, batch_size: int = 128,
                 split: str | None = None, sparse: bool = False) -> dict[str, float]:
    """Score a finished run; `sparse`: with its pruned Linear layers run by the sparse kernel."""
    settings, spec, base, model = load_run(run_dir, data_dir, batch_size)
    return _score(model, base, spec, settings, batch_size, split, sparse)


def evaluate_patch(patch_path: str | Path, task: str | None = None, data_dir: str | None = None,
                   batch_size: int = 128, model: str | None = None, max_seq_length: int | None = None,
                   split: str | None = None, sparse: bool = False) -> dict[str, float]:
    """Apply a patch onto its base (fingerprint checked) and score it on the task's dev set(s),
    with inputs truncated as in training (recorded in the patch) unless `max_seq_length` says;
    `sparse`: with the pruned Linear layers run by the sparse kernel (diffprune.sparse)."""
    from diffprune.patch import TaskPatch
    from diffprune.patch.ops import base_for

    patch = TaskPatch.load(patch_path)
    trained_on = patch.meta.get("task")
    spec = get_task(task or trained_on or "")
    if trained_on and get_task(trained_on) != spec:  # allowed (a transfer test), but rarely meant
        warnings.warn(DiffpruneWarning(f"the patch was trained on {get_task(trained_on).name}, not {spec.name}; "
                                       f"scoring it on {spec.name} anyway"), stacklevel=2)
    base = base_for(patch, model)
    patch.apply(base)
    length = max_seq_length or patch.meta.get("max_seq_length") or TrainSettings.max_seq_length
    settings = TrainSettings(task=spec.name, data_dir=data_dir, max_seq_length=length)
    return _score(base.model, base, spec, settings, batch_size, split, sparse)


def _score(model, base: BaseModel, spec: TaskSpec, settings: TrainSettings, batch_size: int,
           split: str | None, sparse: bool = False) -> dict[str, float]:
    """Metrics of a model on the task's dev split(s): every split, or the one named."""
    settings.max_eval_samples = None
    data = load_task_data(spec, base, settings, with_train=False)
    if split is not None:
        split = resolve_split(spec, split)  # "validation" -> "dev"; MNLI's "dev" -> "dev_matched"
        if split not in data.dev:
            raise DiffpruneError(f"{spec.name} has no dev split '{split}'; choose one of {', '.join(data.dev)}")
        data.dev = {split: data.dev[split]}
    accelerator = Accelerator()
    model = model.to(accelerator.device)
    if sparse:
        from diffprune.sparse import sparsify_for_eval

        sparsify_for_eval(model, batch_size, settings.max_seq_length)
    return dev_metrics(model, data, make_collator(base.tokenizer), accelerator, batch_size)


def predict_run(run_dir: str | Path, output: str | Path, data_dir: str | None = None,
                batch_size: int = 128, overwrite: bool = False) -> list[Path]:
    """Predict the test split(s) and write GLUE submission files into `output`; an existing
    submission file is replaced only with `overwrite`."""
    run = Path(run_dir) if run_dir else None
    if run is not None and (run / "settings.json").exists():  # refused before the model loads
        spec = get_task(json.loads((run / "settings.json").read_text()).get("task", ""))
        for split in spec.test_splits:
            submission_path(spec, split, output, overwrite)
    settings, spec, base, model = load_run(run_dir, data_dir, batch_size)
    accelerator, collator, paths = Accelerator(), make_collator(base.tokenizer), []
    model.to(accelerator.device)
    for split in spec.test_splits:
        examples = load_split(spec, split, settings.data_dir)
        dataset = TokenizedDataset(examples, base.tokenizer, settings.max_seq_length)
        logits = predict_logits(model, dataset, collator, accelerator, batch_size)
        paths.append(write_submission(spec, split, examples, predictions_from_logits(spec, logits), output,
                                      overwrite))
    return paths


def _jsonable_options(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(vars(config), default=str))


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    Linux's VmHWM belongs to this process's own address space; getrusage's ru_maxrss is not
    used there because it survives fork + exec, so a child of a large parent reports the parent.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1024 * 1024 if platform.system() == "Darwin" else 1024), 1)


def device_name(accelerator: Accelerator) -> str:
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_name(accelerator.device)
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"
