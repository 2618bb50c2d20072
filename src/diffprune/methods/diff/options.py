"""Options of the diff methods: what every patch method shares, and what the L0 methods add."""

from __future__ import annotations

from dataclasses import dataclass

from diffprune.errors import DiffpruneError
from diffprune.gates import GateShape
from diffprune.pruning.schedule import begin_option, check_span, reach_option
from diffprune.pruning.topk import SCOPES, budget_option, check_budget, scope_option
from diffprune.training.settings import option


@dataclass
class PatchOptions:
    """What every diff method shares: the budget, the diffed tensors, the fixed-mask phase, the file."""

    budget: float = budget_option()
    budget_scope: str = scope_option()
    budget_counts_head: bool = option(False, "Count the dense head inside the budget (the reference code's choice).")
    fixed_init: str = option("projected", "Fixed-mask start: projected (the paper's delta) or w (the reference code).")
    fixed_epochs: float | None = option(
        None, "Epochs of the fixed-mask phase (0 skips it); default: --epochs. --max-steps overrides it as it "
        "does --epochs."
    )
    fixed_lr: float | None = option(
        None, "Learning rate of the fixed-mask phase; default: 5 x --lr at a budget of 0.5% or more, rising as "
        "0.005 / budget to 15 x --lr at 0.1% and below (a smaller patch moves each entry further)."
    )
    diff_include: str = option("*", "Comma-separated globs of base parameter names to diff (default: all).")
    diff_exclude: str = option("", "Comma-separated globs of base parameter names never to diff.")
    patch_dtype: str = option("float16", "Stored value type of the patch: float32, float16 or bfloat16.")

    CHOICES = {
        "budget_scope": SCOPES,
        "fixed_init": ("projected", "w"),
        "patch_dtype": ("float32", "float16", "bfloat16"),
    }

    def __post_init__(self) -> None:
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                flag = "--" + name.replace("_", "-")
                raise DiffpruneError(f"{flag} must be one of {', '.join(allowed)}, not '{getattr(self, name)}'")
        check_budget(self.budget)  # here, so a bad budget is refused before the model loads
        if self.fixed_lr is not None and self.fixed_lr <= 0:
            raise DiffpruneError("--fixed-lr must be positive")
        if self.fixed_epochs is not None and self.fixed_epochs < 0:
            raise DiffpruneError("--fixed-epochs cannot be negative")


@dataclass
class NonAdaptiveOptions(PatchOptions):
    """Non-adaptive diff pruning: how its dense diff is cut down to the budget."""

    prune: str = option(
        "one-shot", "How the finetuned diff is cut to the budget: one-shot (the paper's baseline: the top-k at the "
        "end) or gradual (the diff's smallest entries zeroed after every step, its density falling on a cubic "
        "schedule to the budget; Zhu and Gupta 2017)."
    )
    prune_begin: float = begin_option()
    prune_reach: float = reach_option()

    CHOICES = {**PatchOptions.CHOICES, "prune": ("one-shot", "gradual")}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_span(self.prune_begin, self.prune_reach)


@dataclass
class DiffOptions(PatchOptions):
    """The learned (L0) methods' options on top: the gates, the penalty and its controller."""

    l0_lambda: float | None = option(
        None, "Fixed L0 penalty weight per entry (paper: 1.25e-7). Default: a density controller sets it."
    )
    target_density: float | None = option(
        None, "Density the controller steers the L0 phase to; default: twice the budget fraction."
    )
    steer: str = option(
        "lambda", "How the L0 phase follows its density schedule: lambda (the controller moves the penalty weight) "
        "or shift (no penalty: after each step every entry gate logit moves down by the amount that puts the "
        "expected density on the schedule)."
    )
    l0_warmup: float = option(
        0.25, "Fraction of the L0 phase with the gates held open while w learns (not with --l0-lambda)."
    )
    l0_reach: float = option(0.75, "Fraction of the L0 phase by which the controller reaches --target-density.")
    controller_gain: float = option(0.1, "Controller: change of log(lambda) per step at a log-density error of 1.")
    schedule: str = option(
        "cubic", "Controller's density schedule: cubic, or reachable (never below the fastest fall the gates can make)."
    )
    controller_lookahead: int = option(
        0, "Controller: steer on the density this many steps ahead, from the gate logits' velocity (0: the density now)."
    )
    alpha_max: float | None = option(
        None, "Upper bound of the gate logits, kept after every step (default: none, as in the paper)."
    )
    alpha_lr: float = option(0.1, "Learning rate of the gate logits (constant, never decayed).")
    alpha_init: float = option(5.0, "Initial gate logit (5: gates start open).")
    gate_l: float = option(-1.5, "Hard-concrete stretch, lower end.")
    gate_r: float = option(1.5, "Hard-concrete stretch, upper end.")
    gate_temperature: float = option(1.0, "Hard-concrete temperature beta (1: none, as in the paper).")
    group_penalty: str = option(
        "additive", "diff-struct penalty: additive (the reference code; default) or product (the paper's equation)."
    )
    projection: str = option("sample", "Gates used for the projection: sample (the paper: one draw) or deterministic.")

    CHOICES = {
        **PatchOptions.CHOICES,
        "group_penalty": ("product", "additive"),
        "projection": ("sample", "deterministic"),
        "schedule": ("cubic", "reachable"),
        "steer": ("lambda", "shift"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l0_lambda is not None and self.l0_lambda < 0:
            raise DiffpruneError("--l0-lambda cannot be negative (a negative penalty rewards density)")
        if self.steer == "shift" and self.l0_lambda is not None:
            raise DiffpruneError("--steer shift uses no penalty: drop --l0-lambda")
        if self.target_density is not None and not 0 < self.target_density <= 1:
            raise DiffpruneError("--target-density must be in (0, 1]")
        if not 0 <= self.l0_warmup < self.l0_reach <= 1:
            raise DiffpruneError("need 0 <= --l0-warmup < --l0-reach <= 1")
        if self.controller_gain <= 0:
            raise DiffpruneError("--controller-gain must be positive")
        if self.controller_lookahead < 0:
            raise DiffpruneError("--controller-lookahead cannot be negative")
        if self.alpha_lr <= 0:
            raise DiffpruneError("--alpha-lr must be positive")
        if self.alpha_max is not None and self.alpha_max < self.alpha_init:
            raise DiffpruneError("--alpha-max must be at least --alpha-init")
        try:
            GateShape(self.gate_l, self.gate_r, self.gate_temperature)
        except ValueError as e:
            raise DiffpruneError(f"--gate-l, --gate-r, --gate-temperature: {e}") from e
