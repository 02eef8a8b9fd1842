"""A Predict request, whichever API brought it: admitted, checked against its signature, and run (through the
batcher when there is one). Its tensors' conversions to and from TensorProto are serving/tensors.py's."""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from serving.batching import Batcher
from serving.errors import Code, ServingError
from serving.tensors import Signature
from serving.versions import ServedVersion


class Predictor:
    """Checks a request against its signature and runs it, through the batcher when there is one.

    It holds at most `max_requests` Predict requests at once (gRPC and REST together, running or waiting for the
    model); one more is refused at once with UNAVAILABLE, which TF Serving's clients (and the gateway) retry
    later. A caller learns that the tier is full now, not when its deadline runs out in a queue."""

    def __init__(self, batcher: Batcher | None, max_requests: int = 0):
        self.batcher = batcher
        self.max_requests = max_requests  # 0: no limit
        self._held = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def admit(self):
        with self._lock:
            if self.max_requests and self._held >= self.max_requests:
                raise ServingError(
                    Code.UNAVAILABLE,
                    f"the model server is at capacity: {self._held} requests in progress "
                    f"(--max_concurrent_requests={self.max_requests}); retry shortly",
                )
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1

    @staticmethod
    def check_input_names(signature: Signature, names) -> None:
        sent, wanted = set(names), set(signature.inputs)
        if len(sent) != len(wanted):
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"input size does not match signature: {len(sent)}!={len(wanted)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(wanted))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
                f"Missing but required: {{{','.join(sorted(wanted - sent))}}}.",
            )
        extra = sorted(sent - wanted)
        if extra:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"input tensor alias not found in signature: {extra[0]}. "
                f"Inputs expected to be in the set {{{','.join(sorted(wanted))}}}.",
            )

    @staticmethod
    def output_aliases(signature: Signature, output_filter) -> list[str]:
        if not output_filter:
            return list(signature.outputs)
        seen = []
        for alias in output_filter:
            if alias not in signature.outputs:
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} "
                    f"Outputs expected to be in the set {{{','.join(signature.outputs)}}}.",
                )
            if alias in seen:
                raise ServingError(Code.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}")
            seen.append(alias)
        return seen

    def run(
        self, served: ServedVersion, signature: Signature, inputs: dict[str, np.ndarray], aliases: list[str]
    ) -> dict[str, np.ndarray]:
        for alias, value in inputs.items():
            spec = signature.inputs[alias]
            if not spec.accepts(value.shape):
                raise ServingError(
                    Code.INVALID_ARGUMENT, f"{alias}: expected shape {spec.shape_text()} but got {list(value.shape)}"
                )
        rows = {v.shape[0] if v.ndim else None for v in inputs.values()}
        if self.batcher is not None and len(rows) == 1 and None not in rows:
            key = (served, signature.name, tuple((a, v.dtype.str, v.shape[1:]) for a, v in sorted(inputs.items())))
            outputs = self.batcher.submit(key, rows.pop(), inputs, lambda merged: served.run(signature, merged))
        else:
            outputs = served.run(signature, inputs)
        return {alias: outputs[alias] for alias in aliases}
