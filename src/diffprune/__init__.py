"""diffprune: learn each task as a tiny sparse patch on one shared, frozen base model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffprune")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from diffprune.errors import DiffpruneError

__all__ = ["DiffpruneError", "__version__"]
