"""Diff pruning: a task as a sparse diff on the frozen base (see method.py)."""

from diffprune.methods.diff import method  # noqa: F401  (registration)
