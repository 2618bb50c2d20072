"""Pruning at distilling (SparseBERT: Xu, Yen, Zhao, Xiao, NAACL 2021), and its comparators.

The student is the *pretrained* base, the teacher a *finetuned* model of the task; the student's
encoder Linear weights are pruned per matrix by magnitude on the cubic schedule (100 events over
the phase) while it learns the teacher's attention scores, hidden states and predictions, the
mask applied again after every optimiser step (the student's weights train). Options give the
comparators in the same harness: no pruning (--sparsity 0), fewer layers (--student-layers),
and gradual magnitude pruning of the finetuned model without distillation
(--student-init teacher --distil-loss task).

The artifact is a patch on the shared base: a `sparse` change for each pruned matrix (its kept
entries and their values; the rest zero) and `add` changes for the dense tensors that changed.
A student with fewer layers than the base is not a patch: it has no tensors for the dropped
layers' and a config of another depth, and a server applying it to the base would run layers
the student never had. It is saved as an HF folder (`model/`), as full finetuning is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffprune.base import BaseModel, load_base
from diffprune.errors import DiffpruneError
from diffprune.io import atomic_dir
from diffprune.methods.artifact import PATCH_FILE, head_state, load_patched, patch_meta, patch_summary, save_patch
from diffprune.methods.distil.layers import PROBABILITIES, count_layers, expose_attention, keep_first_layers, layer_map
from diffprune.methods.distil.losses import kd_terms
from diffprune.methods.distil.model import DistilModel
from diffprune.methods.distil.options import DistilOptions
from diffprune.methods.distil.teacher import check_teacher_fits, load_teacher, teacher_copy
from diffprune.methods.registry import Method, register
from diffprune.patch import TaskPatch
from diffprune.patch.format import VALUE_DTYPES
from diffprune.patch.kinds import SparseDiff
from diffprune.pruning.schedule import PruningSchedule
from diffprune.pruning.targets import prune_targets
from diffprune.pruning.topk import keep_masks, kept_count
from diffprune.training.phases import Phase, standard_groups
from diffprune.training.settings import TrainSettings

MODEL_FOLDER = "model"  # where a student with fewer layers than the base is saved


@register
class PruningAtDistilling(Method):
    name = "distil"
    summary = ("pruning at distilling (SparseBERT): the pretrained base, pruned per matrix on a cubic schedule "
               "while distilled from a finetuned teacher")
    Config = DistilOptions
    artifact = PATCH_FILE
    # Constant, as the paper's; but not the paper's 3e-5, which was set for ~80k steps (12 epochs
    # of 60x augmented data). In 3 epochs (STS-B: 540 steps) a MiniLM student pruned to 95% at
    # 3e-5 ends at a Spearman of 6.7 and at 1e-3 at 74.4 (1e-4: 6.7, 3e-4: 30.6, 3e-3: diverged;
    # its prediction term learning the teacher's outputs); MRPC at 95%: F1 81.2 (the majority
    # class) against 83.1 (benchmarks/README.md). The kept weights must move far to take over
    # from the pruned ones. Without pruning 3e-5 is the better rate (STS-B 84.3 against 83.5).
    default_lr = 1e-3
    fsdp_refused = "its teacher and pruning masks sit beside the student whole; launch it with DDP"

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.artifact = MODEL_FOLDER if self.config.student_layers is not None else PATCH_FILE

    # -- the models -----------------------------------------------------------------------
    def prepare(self, base: BaseModel) -> nn.Module:
        c = self.config
        if getattr(base, "head", "model") != "model":  # the KD terms read the HF model's own outputs
            raise DiffpruneError(f"method 'distil' needs --head model, not {base.head}: its teacher is a full "
                                 "finetuning run, which has the model's own head")
        self.teacher_record: dict | None = None
        teacher = None
        if c.teacher:
            teacher, self.teacher_record = load_teacher(c.teacher, base)
        elif c.needs_teacher():
            teacher = teacher_copy(base)
        layers = count_layers(base.model)
        self.student_layers = c.student_layers or layers
        if self.student_layers > layers:
            raise DiffpruneError(f"--student-layers {self.student_layers}: the base has only {layers} layers")
        kd = c.distil_loss == "kd"
        self.mapping = layer_map(self.student_layers, count_layers(teacher)) if kd else None
        # the base's own values, which the patch's `add` changes are taken against
        self.theta0 = {n: p.detach().to("cpu", copy=True) for n, p in base.base_parameters().items()
                       } if self.artifact == PATCH_FILE else {}
        student = base.model
        if self.student_layers < layers:
            keep_first_layers(student, self.student_layers)
        student.requires_grad_(True)
        if c.freeze_embeddings:
            embeddings(student).requires_grad_(False)
        self.attn_implementation = student.config._attn_implementation
        terms = c.terms() if kd else []
        self.attention = None
        if "attention" in terms:
            self.attention = expose_attention(teacher)
            if expose_attention(student) != self.attention:  # both must give the same kind of map
                self.attention = PROBABILITIES
                teacher.set_attn_implementation("eager")
                student.set_attn_implementation("eager")
        names = tuple(n for n, _ in student.named_parameters() if n not in base.head_names)
        pruned = prune_targets(student, names, c.prune_include) if c.sparsity > 0 else []
        return DistilModel(student, teacher, pruned, teacher_trains=teacher is not None and not c.teacher,
                           hidden="hidden" in terms, attentions="attention" in terms)

    # -- phases ---------------------------------------------------------------------------
    def phases(self, model: DistilModel, base: BaseModel, s: TrainSettings) -> list[Phase]:
        c = self.config
        if self.teacher_record is not None:
            check_teacher_fits(self.teacher_record, c.teacher, s.task, base)
        phases = [self._distil_phase(model, base, s)]
        if not bool(model.distilling):
            phases.insert(0, self._teacher_phase(model, base, s))
        return phases

    def _teacher_phase(self, model: DistilModel, base: BaseModel, s: TrainSettings) -> Phase:
        """Full finetuning of the teacher, as `full` does it (keeping the best epoch)."""
        c = self.config
        head_lr = s.head_lr if s.head_lr is not None else c.teacher_lr
        return Phase(name="teacher", epochs=c.teacher_epochs or s.epochs, max_steps=s.max_steps,
                     warmup_ratio=s.warmup_ratio,
                     param_groups=lambda: standard_groups(model.teacher.named_parameters(), base.head_names,
                                                          c.teacher_lr, head_lr, s.weight_decay))

    def _distil_phase(self, model: DistilModel, base: BaseModel, s: TrainSettings) -> Phase:
        c, lr = self.config, self.lr(s)
        head_lr = s.head_lr if s.head_lr is not None else lr
        schedule = PruningSchedule("cubic", c.sparsity, events=c.pruning_events, begin=c.prune_begin,
                                   reach=c.prune_reach)
        kd = c.distil_loss == "kd"
        regression = base.model.config.problem_type == "regression"

        def groups():
            found = standard_groups(model.student.named_parameters(), base.head_names, lr, head_lr, s.weight_decay)
            for g in found:
                g.schedule = "constant"  # the paper's constant rate
            return found

        def prune(step: int, total: int) -> None:
            """At each pruning event every matrix keeps its largest |w|; after every step the
            pruned entries are zeroed again (the optimiser moves them)."""
            if model.pruned and schedule.event(step, total) != schedule.event(step - 1, total):
                weights = [w.detach().abs() for w in model.weights()]
                model.set_masks(keep_masks(weights, kept_count(schedule.sparsity(step, total), model.total()),
                                           "per-matrix"))
            model.apply_masks()

        return Phase(
            name="distil", param_groups=groups, epochs=s.epochs, max_steps=s.max_steps, warmup_ratio=s.warmup_ratio,
            extra_losses=(lambda inputs: kd_terms(inputs, c.terms(), self.mapping, c.temperature, regression,
                                                  c.regression_target))
            if kd else None,
            teacher=model.teacher_outputs if kd else None, train_task_loss=not kd,
            on_start=lambda: model.start_distilling(copy_teacher=c.student_init == "teacher"),
            after_step=prune if model.pruned else None,
            # a pruned student's earlier epochs are less sparse: only the last one is the model asked for
            keep_best=not model.pruned, metrics=lambda: {"sparsity": model.sparsity()})

    # -- state ----------------------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
        state.update(model.named_buffers(recurse=False))  # which model runs, and the masks
        return state

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(model, state)
        model.train(model.training)  # puts a teacher that is done training back in eval mode

    def trainable_params(self, model: nn.Module) -> int:
        """Entries the task stores: the student's trained tensors, less the pruned entries."""
        trained = sum(p.numel() for p in model.student.parameters() if p.requires_grad)
        return trained - (model.total() - model.kept())

    # -- the artifact ---------------------------------------------------------------------
    def finish(self, model: DistilModel) -> None:
        """Round what the patch stores to its value type, so that the final scores are the
        patch's; give the student back its own attention function (the saved config names it)."""
        model.student.set_attn_implementation(self.attn_implementation)
        model.eval()
        self.changes: dict[str, SparseDiff] = {}
        if self.artifact != PATCH_FILE:
            return
        dtype = VALUE_DTYPES[self.config.patch_dtype]
        params = dict(model.student.named_parameters())
        with torch.no_grad():
            for name in model.pruned:
                w = params[name]
                w.copy_(w.to(dtype).float())
                self.changes[name] = SparseDiff.from_sparse(w)
            for name, theta0 in self.theta0.items():
                if name in model.pruned:
                    continue
                w = params[name]
                diff = (w.detach().cpu() - theta0).to(dtype).float()
                w.copy_((theta0 + diff).to(w.device))
                change = SparseDiff.from_dense(diff)
                if change.nnz:
                    self.changes[name] = change

    def save(self, model: DistilModel, base: BaseModel, output: Path, record: dict) -> dict[str, int]:
        if self.artifact == MODEL_FOLDER:
            with atomic_dir(output / MODEL_FOLDER) as tmp:
                model.student.save_pretrained(tmp)
                base.tokenizer.save_pretrained(tmp)
            return self.artifact_files(output)
        patch = TaskPatch(self.changes, head_state(model.student, base), patch_meta(base, self, record))
        files = save_patch(patch, output, self.config.patch_dtype)
        self.patch_bytes, self.patch_path = files[PATCH_FILE], output / PATCH_FILE
        return files

    def load_artifact(self, base: BaseModel, output: Path) -> nn.Module:
        if self.artifact == MODEL_FOLDER:
            config = base.model.config
            return load_base(output / MODEL_FOLDER, config.num_labels, labels=base.labels,
                             regression=config.problem_type == "regression").model
        return load_patched(base, output)

    def record_extras(self, model: DistilModel, base: BaseModel) -> dict[str, Any]:
        params = dict(model.student.named_parameters())
        zeros = {n: float((params[n] == 0).float().mean()) for n in model.pruned}
        pruned_total = sum(params[n].numel() for n in model.pruned)
        extras = {"sparsity": sum(zeros[n] * params[n].numel() for n in zeros) / max(pruned_total, 1),
                  "target_sparsity": self.config.sparsity, "tensor_sparsity": zeros, "pruned_tensors": len(zeros),
                  "nnz": model.kept(), "student_layers": self.student_layers, "layer_map": self.mapping,
                  "attention_target": self.attention,
                  "teacher": self.config.teacher or ("trained in this run" if model.teacher is not None else None)}
        if getattr(self, "patch_bytes", None) is None:
            return extras
        kinds = {k: sum(d.nnz for d in self.changes.values() if d.kind == k) for k in ("sparse", "add")}
        contents = (f"{kinds['sparse']:,} kept entries of {pruned_total:,} pruned weights, {kinds['add']:,} changed "
                    "entries of the dense tensors")
        return {**extras, **patch_summary(self, contents, model.student)}


def embeddings(model: nn.Module) -> nn.Module:
    """The embedding layer (words, positions, types and their norm where the architecture has
    them together, as BERT's `embeddings`), else the input word embeddings alone."""
    found = getattr(model.base_model, "embeddings", None)
    return found if isinstance(found, nn.Module) else model.get_input_embeddings()
