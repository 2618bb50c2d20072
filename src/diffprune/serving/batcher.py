"""Batching concurrent requests across tasks, with a bounded wait.

Requests from every connection go into one queue. A worker thread takes the first waiting
request, then keeps taking more until the batch holds `max_rows` inputs or `max_wait` seconds
have passed since it took the first, and runs them as one batch (engine.py). So a lone request
waits at most `max_wait`, and under load batches fill up without waiting at all. Stopping lets
the worker finish every request already queued.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

from diffprune.errors import DiffpruneError
from diffprune.serving.engine import Engine, Request

_STOP = object()


class Batcher:
    def __init__(self, engine: Engine, max_rows: int = 64, max_wait: float = 0.005, on_batch=None) -> None:
        self.engine, self.max_rows, self.max_wait = engine, max_rows, max_wait
        self.on_batch = on_batch  # called with (requests, rows, seconds) after every batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="diffprune-batcher", daemon=True)
        self._stopping = False
        self._starting = threading.Lock()

    def start(self) -> None:
        """Start the worker (the first request starts it too, should the app's startup not run)."""
        with self._starting:
            if not self._thread.is_alive() and not self._stopping:
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the worker."""
        self._stopping = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    async def submit(self, request: Request) -> list[dict]:
        if self._stopping:
            raise DiffpruneError("the server is shutting down")
        self.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((request, loop, future))
        return await future

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._fill([first])
            self._run(batch)
            if stop:
                return

    def _fill(self, batch: list) -> tuple[list, bool]:
        rows = len(batch[0][0].inputs)
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_rows:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                return batch + self._drain(), True
            batch.append(item)
            rows += len(item[0].inputs)
        return batch, False

    def _drain(self) -> list:
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return rest
            if item is not _STOP:
                rest.append(item)

    def _run(self, batch: list) -> None:
        start = time.perf_counter()
        try:
            results = self.engine.run([request for request, _, _ in batch])
        except BaseException as e:  # a bug, not bad input: every waiting request hears of it
            results = [e] * len(batch)
        if self.on_batch is not None:
            self.on_batch([r for r, _, _ in batch], time.perf_counter() - start)
        for (_, loop, future), result in zip(batch, results):
            loop.call_soon_threadsafe(_settle, future, result)


def _settle(future: asyncio.Future, result) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
