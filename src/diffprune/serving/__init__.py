"""Serving many tasks on one base: the task bank, switching, mixed-task batches, the HTTP app.

From Python (the HTTP server, `diffprune serve --patches DIR`, runs the same engine)::

    from diffprune.base import load_base
    from diffprune.serving import Engine, Request, TaskBank

    bank = TaskBank(load_base(), "patches/")      # NAME.safetensors files, run folders NAME/
    engine = Engine(bank)
    mrpc, stsb = engine.run([Request("mrpc", [("a sentence", "its pair")]),
                             Request("stsb", [("one", "two")])])   # one mixed forward

Each result is a list of predictions ({"label", "scores"} or {"value"}), or the DiffpruneError
that stopped that request. `bank.refused` says which files were not taken, and why.
"""

from diffprune.serving.bank import LoadedTask, TaskBank, UnknownTask
from diffprune.serving.engine import Engine, Request

__all__ = ["Engine", "LoadedTask", "Request", "TaskBank", "UnknownTask"]
