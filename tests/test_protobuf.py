"""protobuf.py speaks the same bytes as TensorFlow's and TF Serving's own messages."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import protobuf as pb
from conftest import ROOT

DTYPES = ["float32", "float64", "int32", "int64", "uint8", "int8", "int16", "uint16", "float16", "bool", "uint32"]
SHAPES = [(), (0,), (3,), (1, 299, 299, 3), (2, 10), (4, 1, 2)]


def _array(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-100, 100, shape) if dtype != "bool" else rng.uniform(size=shape) > 0.5).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ours_parse_with_tensorflow_and_back(dtype, shape):
    import tensorflow as tf

    array = _array(dtype, shape)
    wire = pb.np_to_protobuf(array).SerializeToString()
    official = tf.make_ndarray(tf.make_tensor_proto(0).FromString(wire))
    assert official.dtype == array.dtype and official.shape == array.shape
    np.testing.assert_array_equal(official, array)
    np.testing.assert_array_equal(pb.protobuf_to_np(pb.TensorProto.FromString(wire)), array)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_tensorflow_typed_and_packed_tensors_parse_with_ours(dtype, shape):
    import tensorflow as tf

    array = _array(dtype, shape, seed=1)
    for proto in (tf.make_tensor_proto(array), _typed_tensor_proto(array)):
        ours = pb.protobuf_to_np(pb.TensorProto.FromString(proto.SerializeToString()))
        assert ours.dtype == array.dtype and ours.shape == array.shape
        np.testing.assert_array_equal(ours, array)


def _typed_tensor_proto(array):
    """What a client that fills `*_val` instead of tensor_content sends (the course's REST-era habit)."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    proto = tensor_pb2.TensorProto(dtype=pb.np_to_protobuf(array).dtype)
    proto.tensor_shape.CopyFrom(
        tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in array.shape])
    )
    flat = array.reshape(-1)
    if array.dtype == np.float16:
        proto.half_val.extend(flat.view(np.uint16).tolist())
    else:
        getattr(proto, pb._TYPED_FIELD[proto.dtype]).extend(flat.tolist())
    return proto


def test_a_single_typed_value_is_broadcast_like_tensorflow():
    import tensorflow as tf

    proto = tf.make_tensor_proto(2.5, shape=[2, 3])  # TF writes one float_val for a filled tensor
    ours = pb.protobuf_to_np(pb.TensorProto.FromString(proto.SerializeToString()))
    np.testing.assert_array_equal(ours, np.full((2, 3), 2.5, np.float32))


def test_strings_round_trip():
    import tensorflow as tf

    array = np.array([b"pants", b"t-shirt"], dtype=object)
    wire = pb.np_to_protobuf(array).SerializeToString()
    assert list(tf.make_ndarray(tf.make_tensor_proto(0).FromString(wire))) == list(array)
    assert list(pb.protobuf_to_np(pb.TensorProto.FromString(wire))) == list(array)


def test_big_endian_input_is_sent_little_endian():
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    np.testing.assert_array_equal(pb.protobuf_to_np(pb.np_to_protobuf(array)), array)


@pytest.mark.parametrize(
    ("proto", "message"),
    [
        (pb.TensorProto(dtype=pb.DT_FLOAT, tensor_content=b"\0" * 7), "holds 7 bytes"),
        (pb.TensorProto(dtype=99), "unsupported TensorFlow DataType 99"),
        (pb.TensorProto(dtype=pb.DT_FLOAT, float_val=[1, 2, 3]), "holds 3 values"),
    ],
)
def test_malformed_tensors_give_clear_errors(proto, message):
    if not proto.tensor_shape.dim and "values" in message:
        proto.tensor_shape.dim.add(size=2)
    if "bytes" in message:
        proto.tensor_shape.dim.add(size=2)
    with pytest.raises(ValueError, match=message):
        pb.protobuf_to_np(proto)


def test_unsupported_numpy_dtype_is_refused_clearly():
    with pytest.raises(ValueError, match="cannot encode a complex64 array"):
        pb.np_to_protobuf(np.zeros(2, np.complex64))


def test_predict_messages_round_trip_with_tensorflow_serving_api():
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

    ours = pb.PredictRequest()
    ours.model_spec.name = "clothing-model"
    ours.model_spec.signature_name = "serving_default"
    ours.model_spec.version.value = 3
    ours.inputs["input_8"].CopyFrom(pb.np_to_protobuf(_array("float32", (1, 299, 299, 3))))
    ours.output_filter.append("dense_7")
    official = predict_pb2.PredictRequest.FromString(ours.SerializeToString())
    assert official.model_spec.name == "clothing-model" and official.model_spec.version.value == 3
    assert list(official.output_filter) == ["dense_7"]
    assert official.inputs["input_8"].tensor_content == ours.inputs["input_8"].tensor_content
    assert pb.PredictRequest.FromString(official.SerializeToString()) == ours

    response = predict_pb2.PredictResponse()
    response.model_spec.name = "clothing-model"
    response.outputs["dense_7"].CopyFrom(
        __import__("tensorflow").make_tensor_proto(np.arange(10, dtype=np.float32).reshape(1, 10))
    )
    parsed = pb.PredictResponse.FromString(response.SerializeToString())
    np.testing.assert_array_equal(pb.protobuf_to_np(parsed.outputs["dense_7"]), np.arange(10).reshape(1, 10))

    status = get_model_status_pb2.GetModelStatusResponse()
    status.model_version_status.add(version=1, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ours_status = pb.GetModelStatusResponse.FromString(status.SerializeToString())
    assert [(s.version, s.state) for s in ours_status.model_version_status] == [(1, pb.AVAILABLE)]

    metadata = get_model_metadata_pb2.GetModelMetadataResponse()
    signatures = get_model_metadata_pb2.SignatureDefMap()
    signature = signatures.signature_def["serving_default"]
    signature.inputs["input_8"].name = "serving_default_input_8:0"
    signature.inputs["input_8"].dtype = pb.DT_FLOAT
    for size in (-1, 299, 299, 3):
        signature.inputs["input_8"].tensor_shape.dim.add(size=size)
    signature.outputs["dense_7"].dtype = pb.DT_FLOAT
    metadata.metadata["signature_def"].Pack(signatures)
    ours_metadata = pb.GetModelMetadataResponse.FromString(metadata.SerializeToString())
    packed = ours_metadata.metadata["signature_def"]
    assert packed.type_url == pb.SIGNATURE_DEF_MAP_TYPE_URL
    ours_signature = pb.SignatureDefMap.FromString(packed.value).signature_def["serving_default"]
    assert [d.size for d in ours_signature.inputs["input_8"].tensor_shape.dim] == [-1, 299, 299, 3]
    assert list(ours_signature.outputs) == ["dense_7"]


def test_every_declared_field_matches_the_official_descriptor():
    """Same full name, same field numbers, same wire types: checked against TensorFlow's own descriptors."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2, status_pb2

    official = {
        m.DESCRIPTOR.full_name: m.DESCRIPTOR
        for m in (
            tensor_pb2.TensorProto,
            tensor_shape_pb2.TensorShapeProto,
            tensor_shape_pb2.TensorShapeProto.Dim,
            meta_graph_pb2.TensorInfo,
            meta_graph_pb2.SignatureDef,
            model_pb2.ModelSpec,
            predict_pb2.PredictRequest,
            predict_pb2.PredictResponse,
            get_model_metadata_pb2.GetModelMetadataRequest,
            get_model_metadata_pb2.GetModelMetadataResponse,
            get_model_metadata_pb2.SignatureDefMap,
            get_model_status_pb2.GetModelStatusRequest,
            get_model_status_pb2.GetModelStatusResponse,
            get_model_status_pb2.ModelVersionStatus,
            status_pb2.StatusProto,
        )
    }
    enum_as_int = {pb._F.TYPE_ENUM, pb._F.TYPE_INT32}
    checked = 0
    for message in (
        pb.TensorProto,
        pb.TensorShapeProto,
        pb.TensorShapeProto.Dim,
        pb.TensorInfo,
        pb.SignatureDef,
        pb.ModelSpec,
        pb.PredictRequest,
        pb.PredictResponse,
        pb.GetModelMetadataRequest,
        pb.GetModelMetadataResponse,
        pb.SignatureDefMap,
        pb.GetModelStatusRequest,
        pb.GetModelStatusResponse,
        pb.ModelVersionStatus,
        pb.StatusProto,
    ):
        ours = message.DESCRIPTOR
        theirs = official[ours.full_name]
        for field in ours.fields:
            other = theirs.fields_by_name[field.name]
            assert field.number == other.number, f"{ours.full_name}.{field.name}"
            assert field.type == other.type or {field.type, other.type} <= enum_as_int, f"{ours.full_name}.{field.name}"
            assert field.is_repeated == other.is_repeated, f"{ours.full_name}.{field.name}"
            if field.message_type is not None:
                assert field.message_type.full_name == other.message_type.full_name
            if field.enum_type is not None:  # the same names for the same numbers, which REST's JSON shows
                values = {v.number: v.name for v in field.enum_type.values}
                assert values.items() <= {v.number: v.name for v in other.enum_type.values}.items()
            oneof, other_oneof = field.containing_oneof, other.containing_oneof
            assert (oneof and oneof.name) == (other_oneof and other_oneof.name), f"{ours.full_name}.{field.name}"
            checked += 1
    assert checked >= 40


def test_gateway_modules_do_not_import_tensorflow():
    """protobuf.py alone, in a fresh interpreter, pulls in no TensorFlow (the gateway test checks the rest)."""
    code = (
        "import sys, numpy as np, protobuf as pb\n"
        "request = pb.PredictRequest(inputs={'x': pb.np_to_protobuf(np.zeros((1, 3), 'float32'))})\n"
        "pb.protobuf_to_np(pb.PredictRequest.FromString(request.SerializeToString()).inputs['x'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_serving', 'keras')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
