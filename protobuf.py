"""TF Serving's protobuf messages and a numpy codec, without TensorFlow.

`tensorflow-serving-api` imports all of TensorFlow (about 4 s and 1.5 GB) just to build a request, and
`tensorflow-protobuf` replaces the real `tensorflow` package with its own. The gateway and model_server.py need
neither: they need a handful of messages. This module declares them from descriptors with the same full names,
field numbers, enums and oneofs as TensorFlow's `.proto` files, so the bytes on the wire and the REST API's JSON are
the same (the tests parse ours with the official classes and the reverse). Only the fields the gateway and the
server use are declared; fields they do not know are kept as unknown fields, which protobuf carries through untouched.

The messages live in a private descriptor pool, so this module can share a process with the real
TensorFlow (the tests do) without a clash in the default pool.
"""

from __future__ import annotations

import numpy as np
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

_F = descriptor_pb2.FieldDescriptorProto

# tensorflow/core/framework/types.proto, the values the codec handles.
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING = 1, 2, 3, 4, 5, 6, 7
DT_INT64, DT_BOOL, DT_UINT16, DT_HALF, DT_UINT32, DT_UINT64 = 9, 10, 17, 19, 22, 23

_DTYPES = {
    DT_FLOAT: np.dtype("<f4"),
    DT_DOUBLE: np.dtype("<f8"),
    DT_INT32: np.dtype("<i4"),
    DT_UINT8: np.dtype("u1"),
    DT_INT16: np.dtype("<i2"),
    DT_INT8: np.dtype("i1"),
    DT_INT64: np.dtype("<i8"),
    DT_BOOL: np.dtype("?"),
    DT_UINT16: np.dtype("<u2"),
    DT_HALF: np.dtype("<f2"),
    DT_UINT32: np.dtype("<u4"),
    DT_UINT64: np.dtype("<u8"),
}
_DATA_TYPES = {dtype: code for code, dtype in _DTYPES.items()}

# Which typed field holds the values of each dtype when tensor_content is empty (tensor.proto).
_TYPED_FIELD = {
    DT_FLOAT: "float_val",
    DT_DOUBLE: "double_val",
    DT_INT32: "int_val",
    DT_UINT8: "int_val",
    DT_INT16: "int_val",
    DT_INT8: "int_val",
    DT_UINT16: "int_val",
    DT_HALF: "half_val",
    DT_INT64: "int64_val",
    DT_BOOL: "bool_val",
    DT_UINT32: "uint32_val",
    DT_UINT64: "uint64_val",
    DT_STRING: "string_val",
}

# Every DataType of tensorflow/core/framework/types.proto up to DT_UINT64, by number: the names errors and JSON show.
# fmt: off
_DATA_TYPE_NAMES = [
    "DT_INVALID", "DT_FLOAT", "DT_DOUBLE", "DT_INT32", "DT_UINT8", "DT_INT16", "DT_INT8", "DT_STRING", "DT_COMPLEX64",
    "DT_INT64", "DT_BOOL", "DT_QINT8", "DT_QUINT8", "DT_QINT32", "DT_BFLOAT16", "DT_QINT16", "DT_QUINT16", "DT_UINT16",
    "DT_COMPLEX128", "DT_HALF", "DT_RESOURCE", "DT_VARIANT", "DT_UINT32", "DT_UINT64",
]
# tensorflow/core/protobuf/error_codes.proto (the numbers are gRPC's status codes).
_ERROR_CODE_NAMES = [
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
]
# fmt: on

# The state of a model version (tensorflow_serving/apis/get_model_status.proto).
MODEL_STATE_NAMES = {0: "UNKNOWN", 10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}
START, LOADING, AVAILABLE, UNLOADING, END = 10, 20, 30, 40, 50

# gRPC method paths, as TF Serving registers them.
PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
METADATA_METHOD = "/tensorflow.serving.PredictionService/GetModelMetadata"
STATUS_METHOD = "/tensorflow.serving.ModelService/GetModelStatus"
SIGNATURE_DEF_MAP_TYPE_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"


def _enum(parent, name, values):
    """Add an enum of {number: name} to a file or a message."""
    enum = parent.enum_type.add(name=name)
    enum.value.extend(descriptor_pb2.EnumValueDescriptorProto(name=n, number=v) for v, n in values.items())
    return enum


def _field(name, number, kind, type_name=None, repeated=False, packed=False, oneof=None):
    field = _F(name=name, number=number, type=kind, label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if oneof is not None:  # the index of the message's oneof this field belongs to
        field.oneof_index = oneof
    if type_name:
        field.type_name = type_name
    if packed:
        field.options.packed = True
    return field


def _message(file, name, fields, maps=(), oneofs=()):
    """Add a message to `file`; `maps` are (field name, number, value type name) for map<string, V>; `oneofs` names
    the message's oneofs, which fields join by index."""
    message = file.message_type.add(name=name)
    message.oneof_decl.extend(descriptor_pb2.OneofDescriptorProto(name=oneof) for oneof in oneofs)
    message.field.extend(fields)
    for field_name, number, value_type in maps:
        entry_name = "".join(part.capitalize() for part in field_name.split("_")) + "Entry"
        entry = message.nested_type.add(name=entry_name)
        entry.options.map_entry = True
        entry.field.extend([_field("key", 1, _F.TYPE_STRING), _field("value", 2, _F.TYPE_MESSAGE, value_type)])
        message.field.append(
            _field(field_name, number, _F.TYPE_MESSAGE, f".{file.package}.{name}.{entry_name}", repeated=True)
        )
    return message


def _build_pool():
    """A descriptor pool of its own with protobuf's Any and wrappers, then TensorFlow's and TF Serving's messages."""
    pool = descriptor_pool.DescriptorPool()
    for well_known in (any_pb2, wrappers_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        well_known.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    pool.Add(_framework_file())
    pool.Add(_error_codes_file())
    pool.Add(_serving_file())
    return pool


def _framework_file() -> descriptor_pb2.FileDescriptorProto:
    """TensorFlow's messages the API carries: tensors, their shapes, and signatures."""
    framework = descriptor_pb2.FileDescriptorProto(name="clothing/tensorflow_framework.proto", package="tensorflow")
    framework.syntax = "proto3"
    _enum(framework, "DataType", dict(enumerate(_DATA_TYPE_NAMES)))
    shape = _message(framework, "TensorShapeProto", [_field("unknown_rank", 3, _F.TYPE_BOOL)])
    dim = shape.nested_type.add(name="Dim")
    dim.field.extend([_field("size", 1, _F.TYPE_INT64), _field("name", 2, _F.TYPE_STRING)])
    shape.field.append(_field("dim", 2, _F.TYPE_MESSAGE, ".tensorflow.TensorShapeProto.Dim", repeated=True))
    _message(
        framework,
        "TensorProto",
        [
            _field("dtype", 1, _F.TYPE_ENUM, ".tensorflow.DataType"),
            _field("tensor_shape", 2, _F.TYPE_MESSAGE, ".tensorflow.TensorShapeProto"),
            _field("version_number", 3, _F.TYPE_INT32),
            _field("tensor_content", 4, _F.TYPE_BYTES),
            _field("half_val", 13, _F.TYPE_INT32, repeated=True, packed=True),
            _field("float_val", 5, _F.TYPE_FLOAT, repeated=True, packed=True),
            _field("double_val", 6, _F.TYPE_DOUBLE, repeated=True, packed=True),
            _field("int_val", 7, _F.TYPE_INT32, repeated=True, packed=True),
            _field("string_val", 8, _F.TYPE_BYTES, repeated=True),
            _field("int64_val", 10, _F.TYPE_INT64, repeated=True, packed=True),
            _field("bool_val", 11, _F.TYPE_BOOL, repeated=True, packed=True),
            _field("uint32_val", 16, _F.TYPE_UINT32, repeated=True, packed=True),
            _field("uint64_val", 17, _F.TYPE_UINT64, repeated=True, packed=True),
        ],
    )
    # meta_graph.proto: only the dense encoding of TensorInfo (name), which is what SavedModels serve.
    _message(
        framework,
        "TensorInfo",
        [
            _field("name", 1, _F.TYPE_STRING, oneof=0),
            _field("dtype", 2, _F.TYPE_ENUM, ".tensorflow.DataType"),
            _field("tensor_shape", 3, _F.TYPE_MESSAGE, ".tensorflow.TensorShapeProto"),
        ],
        oneofs=["encoding"],
    )
    _message(
        framework,
        "SignatureDef",
        [_field("method_name", 3, _F.TYPE_STRING)],
        maps=[("inputs", 1, ".tensorflow.TensorInfo"), ("outputs", 2, ".tensorflow.TensorInfo")],
    )
    return framework


def _error_codes_file() -> descriptor_pb2.FileDescriptorProto:
    """tensorflow.error.Code, the type of a version's error code in GetModelStatus (shown by name in REST)."""
    errors = descriptor_pb2.FileDescriptorProto(
        name="clothing/tensorflow_error_codes.proto", package="tensorflow.error"
    )
    errors.syntax = "proto3"
    _enum(errors, "Code", dict(enumerate(_ERROR_CODE_NAMES)))
    return errors


def _serving_file() -> descriptor_pb2.FileDescriptorProto:
    """TF Serving's PredictionService and ModelService messages, as far as the gateway and the server use them."""
    serving = descriptor_pb2.FileDescriptorProto(
        name="clothing/tensorflow_serving_apis.proto", package="tensorflow.serving"
    )
    serving.syntax = "proto3"
    serving.dependency.extend(
        [
            "google/protobuf/any.proto",
            "google/protobuf/wrappers.proto",
            "clothing/tensorflow_framework.proto",
            "clothing/tensorflow_error_codes.proto",
        ]
    )
    _message(
        serving,
        "ModelSpec",
        [
            _field("name", 1, _F.TYPE_STRING),
            _field("version", 2, _F.TYPE_MESSAGE, ".google.protobuf.Int64Value", oneof=0),
            _field("signature_name", 3, _F.TYPE_STRING),
            _field("version_label", 4, _F.TYPE_STRING, oneof=0),
        ],
        oneofs=["version_choice"],
    )
    _message(
        serving,
        "PredictRequest",
        [
            _field("model_spec", 1, _F.TYPE_MESSAGE, ".tensorflow.serving.ModelSpec"),
            _field("output_filter", 3, _F.TYPE_STRING, repeated=True),
        ],
        maps=[("inputs", 2, ".tensorflow.TensorProto")],
    )
    _message(
        serving,
        "PredictResponse",
        [_field("model_spec", 2, _F.TYPE_MESSAGE, ".tensorflow.serving.ModelSpec")],
        maps=[("outputs", 1, ".tensorflow.TensorProto")],
    )
    _message(
        serving,
        "GetModelMetadataRequest",
        [
            _field("model_spec", 1, _F.TYPE_MESSAGE, ".tensorflow.serving.ModelSpec"),
            _field("metadata_field", 2, _F.TYPE_STRING, repeated=True),
        ],
    )
    _message(
        serving,
        "GetModelMetadataResponse",
        [_field("model_spec", 1, _F.TYPE_MESSAGE, ".tensorflow.serving.ModelSpec")],
        maps=[("metadata", 2, ".google.protobuf.Any")],
    )
    _message(serving, "SignatureDefMap", [], maps=[("signature_def", 1, ".tensorflow.SignatureDef")])
    _message(
        serving,
        "StatusProto",
        [_field("error_code", 1, _F.TYPE_ENUM, ".tensorflow.error.Code"), _field("error_message", 2, _F.TYPE_STRING)],
    )
    status = _message(
        serving,
        "ModelVersionStatus",
        [
            _field("version", 1, _F.TYPE_INT64),
            _field("state", 2, _F.TYPE_ENUM, ".tensorflow.serving.ModelVersionStatus.State"),
            _field("status", 3, _F.TYPE_MESSAGE, ".tensorflow.serving.StatusProto"),
        ],
    )
    _enum(status, "State", MODEL_STATE_NAMES)
    _message(
        serving,
        "GetModelStatusRequest",
        [_field("model_spec", 1, _F.TYPE_MESSAGE, ".tensorflow.serving.ModelSpec")],
    )
    _message(
        serving,
        "GetModelStatusResponse",
        [_field("model_version_status", 1, _F.TYPE_MESSAGE, ".tensorflow.serving.ModelVersionStatus", repeated=True)],
    )
    return serving


_POOL = _build_pool()


def _message_class(full_name):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(full_name))


TensorShapeProto = _message_class("tensorflow.TensorShapeProto")
TensorProto = _message_class("tensorflow.TensorProto")
TensorInfo = _message_class("tensorflow.TensorInfo")
SignatureDef = _message_class("tensorflow.SignatureDef")
ModelSpec = _message_class("tensorflow.serving.ModelSpec")
PredictRequest = _message_class("tensorflow.serving.PredictRequest")
PredictResponse = _message_class("tensorflow.serving.PredictResponse")
GetModelMetadataRequest = _message_class("tensorflow.serving.GetModelMetadataRequest")
GetModelMetadataResponse = _message_class("tensorflow.serving.GetModelMetadataResponse")
SignatureDefMap = _message_class("tensorflow.serving.SignatureDefMap")
GetModelStatusRequest = _message_class("tensorflow.serving.GetModelStatusRequest")
GetModelStatusResponse = _message_class("tensorflow.serving.GetModelStatusResponse")
ModelVersionStatus = _message_class("tensorflow.serving.ModelVersionStatus")
StatusProto = _message_class("tensorflow.serving.StatusProto")


def dtype_name(data_type: int) -> str:
    """DT_FLOAT for 1: TensorFlow's name of a DataType value, as TF Serving's errors spell it."""
    if 0 <= data_type < len(_DATA_TYPE_NAMES):
        return _DATA_TYPE_NAMES[data_type]
    return f"dtype {data_type}"


def data_type_of(dtype) -> int:
    """The TensorFlow DataType value of a numpy dtype (strings: DT_STRING); ValueError names the ones supported."""
    dtype = np.dtype(dtype)
    if dtype.kind in "SUO":
        return DT_STRING
    try:
        return _DATA_TYPES[dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype]
    except KeyError:
        raise ValueError(
            f"no TensorFlow DataType for {dtype}; use one of {sorted(str(d) for d in _DATA_TYPES)} or strings"
        ) from None


def typed_field(data_type: int) -> str | None:
    """The TensorProto field that holds values of this DataType when tensor_content does not (None: no such field)."""
    return _TYPED_FIELD.get(data_type)


def dtype_of(data_type: int) -> np.dtype:
    """The numpy dtype for a TensorFlow DataType value; ValueError names the ones supported."""
    if data_type == DT_STRING:
        return np.dtype(object)
    try:
        return _DTYPES[data_type]
    except KeyError:
        supported = sorted([*_DTYPES, DT_STRING])
        raise ValueError(f"unsupported TensorFlow DataType {data_type}; supported: {supported}") from None


def np_to_protobuf(array) -> TensorProto:
    """A numpy array as a TensorProto with the values packed in `tensor_content` (little-endian).

    `tensor_content` is one bytes field: encoding is a memory copy, against one varint-tagged value
    per element for the typed fields. Strings (bytes or str arrays) go to `string_val`.
    """
    array = np.asarray(array)
    proto = TensorProto()
    proto.tensor_shape.dim.extend(TensorShapeProto.Dim(size=size) for size in array.shape)
    if array.dtype.kind in "SUO":
        proto.dtype = DT_STRING
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1))
        return proto
    wire = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    try:
        proto.dtype = _DATA_TYPES[wire]
    except KeyError:
        raise ValueError(
            f"cannot encode a {array.dtype} array as a TensorProto; use one of "
            f"{sorted(str(d) for d in _DATA_TYPES)} or strings"
        ) from None
    proto.tensor_content = np.ascontiguousarray(array, dtype=wire).tobytes()
    return proto


def protobuf_to_np(proto: TensorProto) -> np.ndarray:
    """A TensorProto as a numpy array, from `tensor_content` or from the typed `*_val` field.

    As in TensorFlow, a typed field holding a single value for a larger shape is broadcast.
    """
    shape = tuple(dim.size for dim in proto.tensor_shape.dim)
    if proto.tensor_shape.unknown_rank:
        raise ValueError("cannot decode a TensorProto of unknown rank")
    if any(size < 0 for size in shape):
        raise ValueError(f"cannot decode a TensorProto with an unknown dimension: shape {list(shape)}")
    dtype = dtype_of(proto.dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if proto.dtype == DT_STRING:
        values = np.array(list(proto.string_val), dtype=object)
    elif proto.tensor_content:
        if len(proto.tensor_content) != count * dtype.itemsize:
            raise ValueError(
                f"tensor_content holds {len(proto.tensor_content)} bytes; shape {list(shape)} of "
                f"{dtype} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    else:
        raw = getattr(proto, _TYPED_FIELD[proto.dtype])
        if proto.dtype == DT_HALF:
            values = np.array(raw, dtype=np.uint16).view(np.float16)
        else:
            values = np.array(raw, dtype=dtype.newbyteorder("="))
    if values.size == count:
        return values.reshape(shape)
    if values.size == 1:
        return np.full(shape, values[0], dtype=values.dtype)
    if values.size == 0 and count == 0:
        return values.reshape(shape)
    raise ValueError(f"TensorProto holds {values.size} values; shape {list(shape)} needs {count}")
