"""Task patches: a task's sparse changes to the frozen base (added, switched off or replaced
entries) plus its dense head, in one small file."""

from diffprune.patch.codec import decode_positions, encode_positions, information_bound_bits
from diffprune.patch.kinds import ADD, KINDS, MASK, SPARSE, SparseDiff
from diffprune.patch.taskpatch import AppliedPatch, TaskPatch, export_model

__all__ = [
    "ADD",
    "KINDS",
    "MASK",
    "SPARSE",
    "AppliedPatch",
    "SparseDiff",
    "TaskPatch",
    "decode_positions",
    "encode_positions",
    "export_model",
    "information_bound_bits",
]
