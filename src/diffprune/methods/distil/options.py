"""Options of pruning at distilling (SparseBERT, Xu et al. 2021) and of its comparators."""

from __future__ import annotations

from dataclasses import dataclass

from diffprune.errors import DiffpruneError
from diffprune.pruning.schedule import check_span
from diffprune.pruning.targets import targets_option
from diffprune.training.settings import option

KD_TERMS = ("attention", "hidden", "prediction")
STUDENT_INITS = ("pretrained", "teacher")
LOSSES = ("kd", "task")
REGRESSION_TARGETS = ("labels", "teacher")
PATCH_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class DistilOptions:
    sparsity: float = option(
        0.95, "Fraction of every pruned matrix's entries that are zero at the end, the same in each matrix, in "
        "[0, 1) (0: distillation without pruning)."
    )
    prune_include: str = targets_option()
    pruning_events: int = option(100, "Gradual pruning: how many times the mask is recomputed from |w| (cubic).")
    prune_begin: float = option(0.0, "Fraction of the distillation phase before the first entry is pruned.")
    prune_reach: float = option(1.0, "Fraction of the distillation phase by which --sparsity is reached.")
    teacher: str | None = option(
        None, "Run folder of a finished `full` run of the same task on the same base: the teacher. Without it the "
        "teacher is finetuned first in this run (a phase of --teacher-epochs at --teacher-lr)."
    )
    teacher_epochs: float | None = option(None, "Epochs of the in-run teacher phase; default: --epochs.")
    teacher_lr: float = option(5e-5, "Peak learning rate of the in-run teacher phase (full finetuning's default).")
    student_layers: int | None = option(
        None, "Layers of the student: the base's first N (default: all). The teacher's layers map onto them "
        "uniformly (TinyBERT): student layer i learns from teacher layer i * L_teacher / N, so N must divide "
        "the teacher's layer count. A student with fewer layers is saved as an HF folder, not a patch."
    )
    student_init: str = option(
        "pretrained", "What the student starts from: pretrained (the base: SparseBERT) or teacher (the finetuned "
        "teacher: with --distil-loss task, gradual magnitude pruning of a finetuned model)."
    )
    distil_loss: str = option(
        "kd", "What the student trains on: kd (the --kd-terms against the teacher; the hard labels are only "
        "logged) or task (the task loss alone: pruning without distillation)."
    )
    kd_terms: str = option(
        "attention,hidden,prediction", "Comma-separated distillation terms, each logged by name. attention: MSE "
        "of every mapped layer's attention scores before the softmax (an attention function that reproduces the "
        "model's own, checked on a probe input at load; where it does not, the post-softmax probabilities "
        "transformers returns with output_attentions), padded positions left out; hidden: MSE of every mapped "
        "layer's hidden states, the embedding output included, padded positions left out; prediction: soft "
        "cross-entropy of the logits at --temperature (for regression the MSE to --regression-target)."
    )
    temperature: float = option(1.0, "Softmax temperature of the prediction term (the paper: 1).")
    regression_target: str = option(
        "labels", "What a regression task's prediction term (MSE) learns: labels (the paper's code) or teacher "
        "(the teacher's outputs)."
    )
    freeze_embeddings: bool = option(
        False, "Keep the embedding layer (words, positions, types, its LayerNorm) frozen: the patch then stores "
        "no embedding change, most of a dense diff's bytes."
    )
    patch_dtype: str = option("float16", "Stored value type of the patch: float32, float16 or bfloat16.")

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise DiffpruneError(f"--sparsity must be in [0, 1), not {self.sparsity}")
        if self.pruning_events < 1:
            raise DiffpruneError("--pruning-events must be at least 1")
        check_span(self.prune_begin, self.prune_reach)
        if self.student_layers is not None and self.student_layers < 1:
            raise DiffpruneError(f"--student-layers must be at least 1, not {self.student_layers}")
        if self.teacher_epochs is not None and self.teacher_epochs <= 0:
            raise DiffpruneError("--teacher-epochs must be positive")
        if not self.teacher_lr > 0 or not self.temperature > 0:
            raise DiffpruneError("--teacher-lr and --temperature must be positive")
        for name, value, allowed in (("--student-init", self.student_init, STUDENT_INITS),
                                     ("--distil-loss", self.distil_loss, LOSSES),
                                     ("--patch-dtype", self.patch_dtype, PATCH_DTYPES),
                                     ("--regression-target", self.regression_target, REGRESSION_TARGETS)):
            if value not in allowed:
                raise DiffpruneError(f"{name} must be one of {', '.join(allowed)}, not '{value}'")
        unknown = [t for t in self.terms() if t not in KD_TERMS]
        if unknown or (self.distil_loss == "kd" and not self.terms()):
            raise DiffpruneError(f"--kd-terms takes a comma-separated subset of {', '.join(KD_TERMS)}, not "
                                 f"'{self.kd_terms}'")
        if self.student_init == "teacher" and self.student_layers is not None:
            raise DiffpruneError("--student-init teacher copies the teacher whole: it takes no --student-layers")

    def terms(self) -> list[str]:
        return [t.strip() for t in self.kd_terms.split(",") if t.strip()]

    def needs_teacher(self) -> bool:
        return self.distil_loss == "kd" or self.student_init == "teacher"
