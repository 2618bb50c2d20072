"""The one training loop: phases on HF Accelerate, dev evaluation, best-keeping, checkpoints.

Determinism is what makes `--resume` exact: each epoch's order comes from its own seeded
generator, no DataLoader touches the global RNG, and the RNG state is checkpointed, so a run
killed at any step and resumed reproduces the uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffprune.errors import DiffpruneError, TrainingDiverged
from diffprune.training.checkpoint import (
    Checkpoint,
    Progress,
    latest_checkpoint,
    non_finite,
    rng_state,
    save_checkpoint,
)
from diffprune.training.logger import RunLogger
from diffprune.training.phases import LossInputs, Phase, build_optimizer, build_scheduler


@dataclass
class LoopContext:
    accelerator: Accelerator
    model: nn.Module  # as prepared by Accelerate (DDP-wrapped when distributed)
    train_set: Dataset
    collator: Callable
    evaluate: Callable[[], dict[str, float]]  # dev metrics of the current model, incl. "score"
    trainable_state: Callable[[], dict[str, torch.Tensor]]
    load_trainable_state: Callable[[dict[str, torch.Tensor]], None]
    output: Path
    logger: RunLogger
    seed: int
    batch_size: int
    max_grad_norm: float
    checkpoint_every: int
    log_every: int
    lengths: list[int] | None = None  # each training example's tokens, to group batches by length


# Batches' worth of a random order sorted together when batches are grouped by length (HF
# Trainer's LengthGroupedSampler takes 50 too): few batches then mix short and long inputs,
# and which examples meet in a batch is still random.
LENGTH_GROUP_BATCHES = 50


def epoch_order(n: int, batch_size: int, seed: int, phase: int, epoch: int,
                lengths: list[int] | None = None) -> list[list[int]]:
    """The global batches of one epoch; a pure function of its arguments. With `lengths`, a
    random order is cut into groups of LENGTH_GROUP_BATCHES batches, each group sorted by
    length (longest first) and cut into batches, and the batches shuffled: batches pad less."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + phase * 10_007 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is not None:
        group = LENGTH_GROUP_BATCHES * batch_size
        order = [i for a in range(0, n, group) for i in sorted(order[a:a + group], key=lambda i: -lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def shard(indices: list[int], accelerator: Accelerator) -> list[int]:
    """This process's share of a global batch (the same global batch on any number of processes)."""
    return indices[accelerator.process_index :: accelerator.num_processes]


def shard_with_weight(indices: list[int], accelerator: Accelerator) -> tuple[list[int], float]:
    """This process's share of a global batch, and the weight of its mean loss that makes DDP's
    average over processes the global batch's mean loss when the shares are uneven. A process
    left without examples (a last batch smaller than the number of processes) still runs one,
    weighted 0, since DDP needs every process in each backward."""
    mine = shard(indices, accelerator)
    if not mine:
        return indices[:1], 0.0
    return mine, len(mine) * accelerator.num_processes / len(indices)


def _optimizer_for(acc: Accelerator, phase: Phase, groups: list, total: int, resume: Checkpoint | None):
    """The phase's optimiser (prepared by Accelerate) and schedule; with `resume`, as the
    checkpoint left them, with the RNG and the fp16 loss scale it had reached."""
    optimizer = build_optimizer(groups)
    scheduler = build_scheduler(optimizer, groups, total, phase.warmup_ratio)
    if resume is not None:
        optimizer.load_state_dict(resume.state["optimizer"])
        scheduler.load_state_dict(resume.state["scheduler"])
        resume.restore_rng(acc.process_index)
        if acc.scaler is not None and "scaler" in resume.state:
            acc.scaler.load_state_dict(resume.state["scaler"])
    return acc.prepare_optimizer(optimizer), scheduler


def run_phases(ctx: LoopContext, phases: list[Phase], resume: Checkpoint | None) -> Progress:
    progress = resume.progress if resume else Progress()
    clock = progress.clock()
    best = resume.best if resume else None
    for index, phase in enumerate(phases):
        if index < progress.phase:
            continue
        resuming = resume is not None and index == progress.phase
        if resuming:
            ctx.load_trainable_state(resume.trainable)
        else:
            progress.phase, progress.phase_step, progress.best_score, progress.best_step = index, 0, None, None
            best = None
            if phase.on_start:
                phase.on_start()
        best = _PhaseRun(ctx, phase, progress, best, clock, resume if resuming else None).run()
        resume = None
    progress.tick(clock)
    return progress


class _PhaseRun:
    """One phase of a run: its optimiser, its steps, dev evaluations, best-keeping, checkpoints."""

    def __init__(self, ctx: LoopContext, phase: Phase, progress: Progress, best: dict | None,
                 clock: tuple[float, float], resume: Checkpoint | None) -> None:
        self.ctx, self.acc, self.phase, self.progress, self.best, self.clock = (
            ctx, ctx.accelerator, phase, progress, best, clock)
        self.steps_per_epoch = math.ceil(len(ctx.train_set) / ctx.batch_size)
        self.groups = phase.param_groups()
        self.trained = [p for g in self.groups for p in g.params]
        self.total = phase.total_steps(self.steps_per_epoch)
        self.optimizer, self.scheduler = _optimizer_for(self.acc, phase, self.groups, self.total, resume)
        self.bar = tqdm(total=self.total, initial=progress.phase_step, desc=phase.name,
                        disable=not self.acc.is_local_main_process, dynamic_ncols=True)

    def run(self) -> dict[str, torch.Tensor] | None:
        """Train to the phase's end or its stop rule; returns the best state kept (if any)."""
        progress, phase = self.progress, self.phase
        self.ctx.model.train()
        while progress.phase_step < self.total and not phase.stopped():
            for weight, batch in self._rest_of_epoch():
                self._step(batch, weight)
                stop = phase.stopped()  # the phase's own stop rule (e.g. a sparsity reached)
                done = progress.phase_step == self.total or stop
                epoch_done = progress.phase_step % self.steps_per_epoch == 0 or done
                if epoch_done:
                    self._evaluate()
                    self.ctx.model.train()
                every = self.ctx.checkpoint_every
                if epoch_done or (every and progress.global_step % every == 0):
                    self._checkpoint()
                if done:
                    break
        self.bar.close()
        if self.acc.num_processes > 1:
            check_replicas(self.acc, self.ctx.trainable_state(), phase.name)
        if phase.keep_best and self.best is not None:
            self.ctx.load_trainable_state(self.best)
        return self.best

    def _rest_of_epoch(self):
        """(loss weight, batch) of this process for the current epoch's remaining steps."""
        ctx = self.ctx
        epoch, start = divmod(self.progress.phase_step, self.steps_per_epoch)
        batches = epoch_order(len(ctx.train_set), ctx.batch_size, ctx.seed, self.progress.phase, epoch,
                              ctx.lengths)[start:]
        shares = [shard_with_weight(b, self.acc) for b in batches]
        loader = DataLoader(ctx.train_set, batch_sampler=[mine for mine, _ in shares], collate_fn=ctx.collator,
                            generator=torch.Generator())
        return ((weight, batch) for (_, weight), batch in zip(shares, loader))

    def _step(self, batch: dict[str, torch.Tensor], weight: float) -> None:
        progress, phase = self.progress, self.phase
        step = progress.global_step + 1
        try:
            terms, stepped = train_step(self.acc, self.ctx.model, phase, self.groups, self.optimizer, self.scheduler,
                                        batch, weight, self.ctx.max_grad_norm)
            progress.phase_step += 1
            progress.global_step += 1
            if phase.after_step and stepped:
                phase.after_step(progress.phase_step, self.total)
            check_weights(self.acc, self.trained)  # after after_step, which may move weights too
        except FloatingPointError as e:
            raise TrainingDiverged(divergence(str(e), step, phase.name, self.ctx.output)) from None
        self.bar.update(1)
        if progress.global_step % self.ctx.log_every == 0 or progress.phase_step == self.total:
            self._log(terms)

    def _log(self, terms: dict[str, torch.Tensor]) -> None:
        values = {k: self.acc.reduce(v, "mean").item() for k, v in terms.items()}
        self.bar.set_postfix_str(loss_summary(values))
        values["lr"] = self.scheduler.get_last_lr()[0]
        values.update(self.phase.metrics() if self.phase.metrics else {})
        self.ctx.logger.log(self.progress.global_step, self.phase.name,
                            self.progress.phase_step / self.steps_per_epoch, values)

    def _checkpoint(self) -> None:
        ctx, acc, progress = self.ctx, self.acc, self.progress
        progress.tick(self.clock)
        state = ctx.trainable_state()
        # The steps' check covers the trained parameters; this one also the state beside them
        # (e.g. the controller's penalty weight), so no checkpoint ever holds a non-finite value.
        bad = non_finite(state)
        if everyone_agrees(acc, bad is not None):
            raise TrainingDiverged(divergence(f"{bad or 'a trained tensor'} is not finite",
                                              progress.global_step, self.phase.name, ctx.output))
        rngs = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        if acc.is_main_process:
            save_checkpoint(ctx.output, progress, state, self.best, self.optimizer, self.scheduler, rngs,
                            scaler=acc.scaler)
            ctx.logger.flush()
        acc.wait_for_everyone()

    def _evaluate(self) -> None:
        progress, name = self.progress, self.phase.name
        metrics = self.ctx.evaluate()
        epoch = progress.phase_step / self.steps_per_epoch
        progress.evals.append({"phase": name, "epoch": round(epoch, 4), "step": progress.global_step, **metrics})
        self.ctx.logger.log(progress.global_step, name, epoch, {f"dev_{k}": v for k, v in metrics.items()})
        if self.acc.is_local_main_process:  # tqdm.write prints even where the bar is disabled
            self.bar.write(f"[{name}] epoch {epoch:.2f}: dev " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.phase.keep_best and (progress.best_score is None or metrics["score"] > progress.best_score):
            progress.best_score, progress.best_step = metrics["score"], progress.global_step
            self.best = {k: v.detach().to("cpu", copy=True) for k, v in self.ctx.trainable_state().items()}


def loss_summary(terms: dict[str, float]) -> str:
    """The progress bar's loss: the task loss first, the other terms apart. Their sum would hide
    it: diff pruning's L0 penalty alone climbs into the hundreds while the task loss falls."""
    others = "  ".join(f"{k} {v:.4g}" for k, v in terms.items() if k not in ("loss", "task_loss"))
    return f"task_loss {terms['task_loss']:.4f}" + (f"  ({others})" if others else "")


def everyone_agrees(acc: Accelerator, flag: bool) -> bool:
    """True on every process if `flag` is true on any: a verdict that stops the run must be
    reached by all processes alike, or those that go on wait for the others forever."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), "sum").item())


@torch.no_grad()
def check_weights(acc: Accelerator, params: list[torch.Tensor]) -> None:
    """Raise FloatingPointError if a trained tensor holds an inf or NaN after a step.

    A finite loss and finite gradients do not make finite weights: a learning rate too large
    for float32 (1e39 is inf) writes inf into every entry it moves. One sum per tensor finds
    them (inf or NaN anywhere makes the sum non-finite); only a non-finite sum, which huge
    finite entries can also give, pays for the exact elementwise test."""
    # float32 sums at least: a float16 sum of a large finite tensor would overflow on its own
    sums = torch.stack([p.sum(dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
                       ) if params else torch.zeros(0)
    bad = not bool(torch.isfinite(sums).all()) and not all(bool(torch.isfinite(p).all()) for p in params)
    if everyone_agrees(acc, bad):
        raise FloatingPointError("a trained weight became infinite or NaN")


def divergence(what: str, step: int, phase: str, output: Path) -> str:
    """The one-line report of a diverged run: what, where, and the checkpoint left to resume."""
    kept = latest_checkpoint(output)
    where = (f"the last finite checkpoint is {kept} (step {kept.name.removeprefix('step-')})" if kept
             else "no checkpoint was written before it")
    return f"training diverged: {what} at step {step} (phase {phase}); {where}"


@torch.no_grad()
def check_replicas(acc: Accelerator, state: dict[str, torch.Tensor], phase: str) -> None:
    """Every process must end a phase with the same weights. DDP synchronises only the
    parameters it registered when it wrapped the model, so a tensor it missed would drift apart
    silently, each process training on its own shard; this turns that into an error."""
    tensors = [t.double() for t in state.values()]
    # two moments per tensor: replicas hold bitwise-equal weights, so their sums agree exactly
    sums = torch.stack([t.sum() for t in tensors] + [t.square().sum() for t in tensors]).to(acc.device)
    everyone = acc.gather(sums.unsqueeze(0))
    if not torch.equal(everyone.amin(0), everyone.amax(0)):
        raise DiffpruneError(f"the processes' models differ after phase {phase}: a trained tensor was not "
                             "synchronised between processes (please report this as a bug)")


def train_step(
    acc: Accelerator, model: nn.Module, phase: Phase, groups: list, optimizer: Any, scheduler: Any, batch: dict,
    weight: float, max_grad_norm: float,
) -> tuple[dict[str, torch.Tensor], bool]:
    """One optimiser step: forward, named loss terms, backward, per-group clipping, update.
    `weight` scales every loss term of this process (see `shard_with_weight`): DDP's average of
    the processes' gradients is then the global batch's, for a term of the batch (the task loss,
    a distillation term) and for one that is the same on every process (a penalty: the weights
    average to 1). Returns the detached loss terms and whether the weights were updated
    (fp16 loss scaling skips a step whose gradients overflowed); raises FloatingPointError (on
    every process) if the loss or a gradient is not finite, before anything is updated."""
    batch = {k: v.to(acc.device) for k, v in batch.items()}
    with acc.autocast():
        outputs = model(**batch)
        terms = {"task_loss": outputs.loss * weight}
        if phase.extra_losses:
            teacher = None
            if phase.teacher is not None:
                with torch.no_grad():
                    teacher = phase.teacher(batch)
            extra = phase.extra_losses(LossInputs(batch, outputs, teacher))
            terms.update({name: term * weight for name, term in extra.items()})
        loss = sum(v for k, v in terms.items() if k != "task_loss" or phase.train_task_loss)
    bad = acc.reduce(torch.tensor(float(not torch.isfinite(loss)), device=acc.device), "sum")
    if bad.item():
        raise FloatingPointError(f"the loss became {loss.item()}")
    acc.backward(loss)
    if acc.sync_gradients:
        acc.unscale_gradients()
        norms = []
        for g in groups:
            limit = g.max_grad_norm if g.max_grad_norm is not None else max_grad_norm
            if limit:
                norms.append(torch.nn.utils.clip_grad_norm_(g.params, limit))
                continue
            grads = [p.grad for p in g.params if p.grad is not None]
            if grads:
                norms.append(torch.nn.utils.get_total_norm(grads))
        # A finite loss can still have an inf gradient; its step would write NaN weights. (With
        # fp16 loss scaling an inf gradient is expected: the scaler skips that step itself.)
        # The gradients are all-reduced, so every process reaches the same verdict.
        if norms and acc.scaler is None and not bool(torch.isfinite(torch.stack(norms)).all()):
            raise FloatingPointError("a gradient became infinite or NaN")
    scale = acc.scaler.get_scale() if acc.scaler is not None else None
    optimizer.step()
    # A step the loss scaler skipped moved no weight: the learning rate schedule (and the
    # phase's after_step, e.g. the density controller) waits for the step that does. The
    # scaler lowers its scale exactly when it skips; accelerate's `step_was_skipped` cannot
    # tell, since a fused AdamW is always called and skips inside its kernel.
    stepped = scale is None or acc.scaler.get_scale() >= scale
    if stepped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}, stepped


@torch.no_grad()
def predict_logits(
    model: nn.Module, dataset: Dataset, collator: Callable, accelerator: Accelerator, batch_size: int
) -> np.ndarray:
    """Logits for every example in order; the work is sharded over processes and gathered.
    The forward runs on the unwrapped model: DDP's forward would broadcast buffers, a collective
    that a process left without examples (a dev set smaller than the processes) never joins."""
    model = accelerator.unwrap_model(model)
    model.eval()
    mine = shard(list(range(len(dataset))), accelerator)
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collator, generator=torch.Generator())
    rows: list[tuple[int, np.ndarray]] = []
    for indices, batch in zip(batches, loader):
        batch = {k: v.to(accelerator.device) for k, v in batch.items() if k != "labels"}
        with accelerator.autocast():
            logits = model(**batch).logits.float().cpu().numpy()
        rows.extend(zip(indices, logits))
    if accelerator.num_processes > 1:
        rows = gather_object(rows)
    rows.sort(key=lambda r: r[0])
    return np.stack([r[1] for r in rows]) if rows else np.zeros((0, 1), dtype=np.float32)
