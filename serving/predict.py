"""A Predict request, whichever API brought it: admitted, checked against its signature, run (through the
batcher when there is one), and its tensors converted to and from TensorProto."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import tensorflow as tf

from serving.batching import Batcher
from serving.errors import Code, ServingError
from serving.versions import ServedVersion, Signature, dtype_name, shape_text

# Where TensorProto keeps the values of each dtype when it does not use tensor_content; TF Serving
# answers in these fields, and clients such as the course notebook read `float_val`.
VALUE_FIELDS = {
    tf.float32: "float_val",
    tf.float64: "double_val",
    tf.int32: "int_val",
    tf.int16: "int_val",
    tf.int8: "int_val",
    tf.uint8: "int_val",
    tf.uint16: "int_val",
    tf.int64: "int64_val",
    tf.uint32: "uint32_val",
    tf.uint64: "uint64_val",
    tf.bool: "bool_val",
    tf.string: "string_val",
    tf.float16: "half_val",
    tf.bfloat16: "half_val",
}


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
            if not spec.shape.is_compatible_with(value.shape):
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"{alias}: expected shape {shape_text(spec.shape)} but got {list(value.shape)}",
                )
        rows = {v.shape[0] if v.ndim else None for v in inputs.values()}
        if self.batcher is not None and len(rows) == 1 and None not in rows:
            key = (served, signature.name, tuple((a, v.dtype.str, v.shape[1:]) for a, v in sorted(inputs.items())))
            outputs = self.batcher.submit(key, rows.pop(), inputs, lambda merged: served.run(signature, merged))
        else:
            outputs = served.run(signature, inputs)
        return {alias: outputs[alias] for alias in aliases}


def tensor_proto_to_array(alias: str, proto, spec: tf.TensorSpec) -> np.ndarray:
    if proto.dtype != spec.dtype.as_datatype_enum:
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"{alias}: expected {dtype_name(spec.dtype.as_datatype_enum)} but got {dtype_name(proto.dtype)}",
        )
    shape = [d.size for d in proto.tensor_shape.dim]
    content = proto.tensor_content  # each access copies the bytes: read them once
    if content and spec.dtype != tf.string and not proto.tensor_shape.unknown_rank:
        # The usual encoding (tf.make_tensor_proto): use the bytes as they are, without another copy.
        dtype = np.dtype(spec.dtype.as_numpy_dtype)
        if min(shape, default=0) < 0 or len(content) != dtype.itemsize * int(np.prod(shape)):
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"tensor parsing error: {alias} ({len(content)} bytes of tensor_content "
                f"do not make a {dtype.name} tensor of shape {shape})",
            )
        return np.frombuffer(content, dtype).reshape(shape)
    try:
        return tf.make_ndarray(proto)
    except Exception as e:
        raise ServingError(Code.INVALID_ARGUMENT, f"tensor parsing error: {alias} ({e})") from e


def array_to_tensor_proto(value: np.ndarray, proto) -> None:
    """Fill `proto` the way TF Serving answers: shape plus the typed value field."""
    dtype = tf.as_dtype(value.dtype)
    name = VALUE_FIELDS.get(dtype)
    if name is None:  # complex and other rare dtypes: TF's own encoding
        proto.CopyFrom(tf.make_tensor_proto(value))
        return
    proto.dtype = dtype.as_datatype_enum
    proto.tensor_shape.dim.extend(proto.tensor_shape.Dim(size=d) for d in value.shape)
    flat = value.ravel()
    if name == "half_val":  # half_val holds the 16-bit patterns
        flat = flat.view(np.uint16)
    getattr(proto, name).extend(flat.tolist())
