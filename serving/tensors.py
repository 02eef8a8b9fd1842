"""Tensors without TensorFlow: what a signature takes and gives (TensorSpec), and TensorProto to and from numpy the
way TF Serving reads and writes them. Every runtime describes its signatures with these, so the APIs need no
TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import protobuf
from serving.errors import Code, ServingError

PREDICT_METHOD_NAME = "tensorflow/serving/predict"  # a SignatureDef's method_name for a predict signature


@dataclass(frozen=True)
class TensorSpec:
    """A signature's tensor: its DataType (protobuf.DT_*) and shape (None for an unknown size; None for an unknown
    rank)."""

    dtype: int
    shape: tuple[int | None, ...] | None

    @property
    def numpy_dtype(self) -> np.dtype:
        return protobuf.dtype_of(self.dtype)

    @property
    def dtype_name(self) -> str:
        """float32, uint8, string: the numpy name, as TensorFlow names its dtypes too."""
        return "string" if self.dtype == protobuf.DT_STRING else self.numpy_dtype.name

    def shape_text(self) -> str:
        if self.shape is None:
            return "[?]"
        return "[" + ",".join("-1" if d is None else str(d) for d in self.shape) + "]"

    def accepts(self, shape: tuple[int, ...]) -> bool:
        if self.shape is None:
            return True
        if len(shape) != len(self.shape):
            return False
        return all(d is None or d == s for d, s in zip(self.shape, shape, strict=True))

    def tensor_info(self, name: str) -> protobuf.TensorInfo:
        """This tensor as GetModelMetadata shows it, under the runtime's own name for it."""
        info = protobuf.TensorInfo(name=name, dtype=self.dtype)
        if self.shape is None:
            info.tensor_shape.unknown_rank = True
        else:
            info.tensor_shape.dim.extend(protobuf.TensorShapeProto.Dim(size=-1 if d is None else d) for d in self.shape)
        return info


@dataclass(frozen=True)
class Signature:
    """A served signature: its name and its tensors by alias. Each runtime adds what it calls."""

    name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def describe(self) -> str:
        def specs(tensors):
            return ", ".join(f"{k} {s.dtype_name}{s.shape_text()}" for k, s in tensors.items())

        return f"signature {self.name}: {specs(self.inputs)} -> {specs(self.outputs)}"


def tensor_proto_to_array(alias: str, proto, spec: TensorSpec) -> np.ndarray:
    """A request's tensor as numpy, checked against the signature's dtype; INVALID_ARGUMENT as TF Serving says it."""
    if proto.dtype != spec.dtype:
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"{alias}: expected {protobuf.dtype_name(spec.dtype)} but got {protobuf.dtype_name(proto.dtype)}",
        )
    shape = [d.size for d in proto.tensor_shape.dim]
    content = proto.tensor_content  # each access copies the bytes: read them once
    if content and spec.dtype != protobuf.DT_STRING and not proto.tensor_shape.unknown_rank:
        # The usual encoding (tensor_content): use the bytes as they are, without another copy.
        dtype = spec.numpy_dtype
        if min(shape, default=0) < 0 or len(content) != dtype.itemsize * int(np.prod(shape)):
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"tensor parsing error: {alias} ({len(content)} bytes of tensor_content "
                f"do not make a {dtype.name} tensor of shape {shape})",
            )
        return np.frombuffer(content, dtype).reshape(shape)
    try:
        return protobuf.protobuf_to_np(proto)
    except ValueError as e:
        raise ServingError(Code.INVALID_ARGUMENT, f"tensor parsing error: {alias} ({e})") from e


def array_to_tensor_proto(value: np.ndarray, proto) -> None:
    """Fill `proto` the way TF Serving answers: shape plus the typed value field (`float_val` for float32, which
    clients such as the course notebook read)."""
    try:
        data_type = protobuf.data_type_of(value.dtype)
    except ValueError as e:
        raise ServingError(Code.INTERNAL, f"cannot send the model's output: {e}") from e
    proto.dtype = data_type
    for size in value.shape:
        proto.tensor_shape.dim.add(size=size)
    flat = value.ravel()
    if data_type == protobuf.DT_HALF:  # half_val holds the 16-bit patterns
        flat = flat.view(np.uint16)
    elif data_type == protobuf.DT_STRING:
        flat = [v if isinstance(v, bytes) else str(v).encode() for v in flat]
    getattr(proto, protobuf.typed_field(data_type)).extend(flat.tolist() if isinstance(flat, np.ndarray) else flat)
