"""Pruning at distilling (SparseBERT) and its comparators: method.py; options, the teacher, the
student's layers and the distillation loss terms beside it."""

from diffprune.methods.distil import method  # noqa: F401  (registration)
