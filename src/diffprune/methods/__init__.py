"""Methods register themselves on import; this list is the only place that names them."""

from diffprune.methods.registry import METHODS, Method, build_method, get_method, register
from diffprune.methods import bitfit, diff, distil, full, head, lora, masking, shira  # noqa: F401  (registration)

__all__ = ["METHODS", "Method", "build_method", "get_method", "register"]
