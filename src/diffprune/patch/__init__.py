"""Task patches: a task's sparse diff on the frozen base plus its dense head, in one small file."""

from diffprune.patch.codec import decode_positions, encode_positions, information_bound_bits
from diffprune.patch.taskpatch import AppliedPatch, SparseDiff, TaskPatch, export_model

__all__ = [
    "AppliedPatch",
    "SparseDiff",
    "TaskPatch",
    "decode_positions",
    "encode_positions",
    "export_model",
    "information_bound_bits",
]
