"""Methods whose task result switches base entries off: adapting by pruning and its baselines."""

from diffprune.methods.masking import abp, method  # noqa: F401  (registration)
