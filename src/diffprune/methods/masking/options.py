"""Options of the methods that switch base entries off: the sparsity and its scope, what is
pruned, the last phase; and what adapting by pruning and gradual magnitude pruning add."""

from __future__ import annotations

from dataclasses import dataclass

from diffprune.errors import DiffpruneError
from diffprune.pruning.schedule import SCHEDULES, begin_option, check_span, reach_option
from diffprune.pruning.targets import targets_option
from diffprune.pruning.topk import check_scope, check_sparsity, scope_option, sparsity_option
from diffprune.training.settings import option


@dataclass
class MaskOptions:
    sparsity: float = sparsity_option()
    prune_scope: str = scope_option()
    prune_include: str = targets_option()
    head_epochs: float = option(
        1.0, "Epochs of the last phase, which trains the head with the exact mask fixed (0: none)."
    )

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        check_scope(self.prune_scope)
        if self.head_epochs < 0:
            raise DiffpruneError("--head-epochs cannot be negative")


@dataclass
class AbpOptions(MaskOptions):
    push: str = option(
        "shift", "How scores are pushed toward pruning: shift (after each step every score moves down by the one "
        "amount that puts the sparsity on a cubic schedule reaching --sparsity at --prune-reach) or loss (the "
        "paper: gamma * sum(scores) added to the loss, a constant push)."
    )
    gamma: float = option(2e-7, "--push loss: the push gamma (the paper's value, for BERT-base at batch 8).")
    prune_begin: float = begin_option()
    prune_reach: float = reach_option()
    score_init: str = option(
        "magnitude", "Where the scores start: magnitude (mean * |w| / mean |w| of the tensor: the mask starts in "
        "the weights' magnitude order and the task reorders it) or paper (N(mean, std^2) for every entry: the "
        "mask starts blind to the weights; on MiniLM it ends near a random mask, see benchmarks/README.md)."
    )
    score_init_mean: float = option(0.01, "Mean of the scores' initial values (the paper: 0.01, every entry kept).")
    score_init_std: float = option(
        0.001, "--score-init paper: standard deviation of the initial scores. The paper writes N(0.01, 0.001) and says every entry "
        "starts kept: only a deviation of 0.001 makes both true (a variance of 0.001 starts 38% pruned)."
    )
    t_forward: float = option(1e5, "Mask slope of the forward pass, sigmoid(t * score) (1e5: a step).")
    t_backward: float = option(1.0, "Mask slope whose derivative the backward pass uses (straight-through).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score_init not in ("paper", "magnitude"):
            raise DiffpruneError(f"--score-init must be paper or magnitude, not '{self.score_init}'")
        if self.push not in ("shift", "loss"):
            raise DiffpruneError(f"--push must be shift or loss, not '{self.push}'")
        check_span(self.prune_begin, self.prune_reach)
        if self.gamma < 0 or self.score_init_std < 0 or self.t_forward <= 0 or self.t_backward <= 0:
            raise DiffpruneError("--gamma and --score-init-std cannot be negative, --t-forward and --t-backward "
                                 "must be positive")


@dataclass
class MagnitudeOptions(MaskOptions):
    prune_scope: str = scope_option("per-matrix")
    prune_schedule: str = option("cubic", "How the sparsity rises: cubic (Zhu and Gupta 2017) or one-shot.")
    pruning_events: int = option(100, "Gradual pruning: how many times the mask is recomputed.")
    prune_begin: float = begin_option()
    prune_reach: float = reach_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prune_schedule not in SCHEDULES:
            raise DiffpruneError(f"--prune-schedule must be one of {', '.join(SCHEDULES)}")
        if self.pruning_events < 1:
            raise DiffpruneError("--pruning-events must be at least 1")
        check_span(self.prune_begin, self.prune_reach)
