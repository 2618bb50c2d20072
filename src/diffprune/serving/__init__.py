"""Serving many tasks on one base: the task bank, switching, mixed-task batches, the HTTP app."""

from diffprune.serving.bank import LoadedTask, TaskBank, UnknownTask
from diffprune.serving.engine import Engine, Request

__all__ = ["Engine", "LoadedTask", "Request", "TaskBank", "UnknownTask"]
