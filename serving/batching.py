"""Dynamic batching: concurrent requests merged into one model call, as TF Serving's --enable_batching does,
configured by the same BatchingParameters text file."""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import numpy as np

from serving.errors import Code, ServingError

log = logging.getLogger("model_server")


@dataclass
class BatchingOptions:
    # TF Serving's defaults for a batching_parameters_file that leaves a field out.
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)


_BATCHING_INT_FIELDS = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")
_TEXT_FIELD = re.compile(r'\s*(\w+)\s*(?:\{\s*value\s*:\s*("[^"]*"|[^\s{}]+)\s*\}|:\s*("[^"]*"|[^\s{}]+))\s*')


def parse_batching_parameters(text: str) -> BatchingOptions:
    """TF Serving's BatchingParameters in protobuf text format, e.g. `max_batch_size { value: 32 }`."""
    options = BatchingOptions()
    text = re.sub(r"#[^\n]*", "", text)
    position = 0
    while position < len(text.rstrip()):
        match = _TEXT_FIELD.match(text, position)
        if not match:
            raise ValueError(f"cannot parse {text[position:].strip()[:40]!r}: expected `name {{ value: N }}`")
        position = match.end()
        name, value = match.group(1), match.group(2) or match.group(3)
        if name not in _BATCHING_INT_FIELDS:
            log.warning("Batching parameter %s is not supported by this server: ignored", name)
            continue
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, not {value}") from None
        if number < (0 if name == "batch_timeout_micros" else 1):
            raise ValueError(f"{name} must be positive, not {number}")
        setattr(options, name, number)
    return options


@dataclass
class _Task:
    key: tuple
    rows: int
    inputs: dict[str, np.ndarray]
    run: object  # callable: merged inputs -> outputs
    enqueued: float
    future: futures.Future = field(default_factory=futures.Future)


class Batcher:
    """Merges concurrent requests into one model call, as TF Serving's --enable_batching does.

    A batch closes when it holds max_batch_size rows or its first request has waited
    batch_timeout_micros; only requests for the same version, signature and row shape are merged.
    At most max_enqueued_batches batches wait, so overload is answered at once instead of queued.
    """

    def __init__(self, options: BatchingOptions):
        self.options = options
        self._capacity = options.max_batch_size * options.max_enqueued_batches
        self._tasks: collections.deque[_Task] = collections.deque()
        self._queued_rows = 0
        self._cv = threading.Condition()
        self._draining = False  # shutting down: no batch waits for more requests
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def drain(self) -> None:
        """From now on run every batch at once: on shutdown no more requests are coming to fill it."""
        with self._cv:
            self._draining = True
            self._cv.notify_all()

    def close(self) -> None:
        """Run what is queued, then stop the batch threads."""
        with self._cv:
            self._draining = self._closed = True
            self._cv.notify_all()
        for thread in self._threads:
            thread.join()

    def submit(self, key: tuple, rows: int, inputs: dict[str, np.ndarray], run) -> dict[str, np.ndarray]:
        limit = self.options.max_batch_size
        if rows > limit:
            raise ServingError(Code.INVALID_ARGUMENT, f"Task size {rows} is larger than maximum batch size {limit}")
        task = _Task(key, rows, inputs, run, time.monotonic())
        with self._cv:
            if self._closed:
                raise ServingError(Code.UNAVAILABLE, "The server is shutting down")
            if self._queued_rows + rows > self._capacity:
                raise ServingError(
                    Code.UNAVAILABLE, "The batch scheduling queue to which this task was submitted is full"
                )
            self._tasks.append(task)
            self._queued_rows += rows
            log.debug("Queued %d rows (%d rows waiting)", rows, self._queued_rows)
            self._cv.notify_all()
        return task.future.result()

    def _next_batch(self) -> list[_Task] | None:
        timeout = self.options.batch_timeout_micros / 1e6
        with self._cv:
            while True:
                if not self._tasks:
                    if self._closed:
                        return None
                    self._cv.wait()
                    continue
                first = self._tasks[0]
                candidates = [t for t in self._tasks if t.key == first.key]
                batch, rows = [], 0
                for task in candidates:
                    if rows + task.rows > self.options.max_batch_size:
                        break
                    batch.append(task)
                    rows += task.rows
                full = rows == self.options.max_batch_size or len(batch) < len(candidates)
                wait = first.enqueued + timeout - time.monotonic()
                if full or wait <= 0 or self._draining:
                    for task in batch:
                        self._tasks.remove(task)
                    self._queued_rows -= rows
                    return batch
                self._cv.wait(wait)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _run(self, batch: list[_Task]) -> None:
        total = sum(t.rows for t in batch)
        try:
            if len(batch) == 1:
                merged = batch[0].inputs
            else:
                merged = {alias: np.concatenate([t.inputs[alias] for t in batch]) for alias in batch[0].inputs}
            outputs = batch[0].run(merged)
            for alias, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != total:
                    raise ServingError(
                        Code.INTERNAL,
                        f"Batched output {alias} has shape {list(value.shape)} for a batch of {total} rows: "
                        "this signature cannot be batched (run without --enable_batching)",
                    )
            log.debug("Ran a batch of %d rows from %d requests", total, len(batch))
            start = 0
            for task in batch:
                task.future.set_result({alias: value[start : start + task.rows] for alias, value in outputs.items()})
                start += task.rows
        except Exception as e:
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(e)
