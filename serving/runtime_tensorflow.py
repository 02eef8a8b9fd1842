"""The TensorFlow runtime: a version is a SavedModel (<version>/saved_model.pb), loaded and called as TF Serving does.
The only module of the server that imports TensorFlow."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import protobuf
from serving.errors import GRPC_CODE_BY_NUMBER, Code, ServingError, StartupError
from serving.tensors import Signature, TensorSpec
from serving.versions import ServedVersion, zero_inputs

log = logging.getLogger("model_server")

MODEL_FILE = "saved_model.pb"


def set_tensorflow_threads(intra_op: int, inter_op: int) -> None:
    """TF Serving's --tensorflow_intra_op_parallelism and --tensorflow_inter_op_parallelism: threads for one
    operation, and for independent operations at once; 0 leaves TensorFlow's choice (about one per core). Set
    before TensorFlow runs anything."""
    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError as e:  # TensorFlow already ran in this process: its thread pools are fixed
        raise StartupError(f"cannot set TensorFlow's threads: {e}") from e


class TensorFlowRuntime:
    name = "TensorFlow"
    model_file = MODEL_FILE

    def __init__(self, intra_op: int = 0, inter_op: int = 0):
        set_tensorflow_threads(intra_op, inter_op)
        log.info(
            "TensorFlow threads: %d per operation, %d for operations at once (0: TensorFlow's choice)",
            tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads(),
        )

    def load(self, version: int, path: Path) -> TensorFlowVersion:
        return TensorFlowVersion(version, path)


@dataclass(frozen=True)
class TensorFlowSignature(Signature):
    function: object = None  # the loaded ConcreteFunction
    direct: object = None  # one tensor -> one tensor, the graph under `function` (see _direct_call); None: not used


def _spec(spec: tf.TensorSpec) -> TensorSpec:
    shape = None if spec.shape.rank is None else tuple(spec.shape.as_list())
    return TensorSpec(spec.dtype.as_datatype_enum, shape)


def signature_defs(version_dir: Path) -> dict[str, protobuf.SignatureDef]:
    """The serving MetaGraphDef's signature_def map, which is what GetModelMetadata returns."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((version_dir / MODEL_FILE).read_bytes())
    graphs = list(saved_model.meta_graphs)
    if not graphs:
        raise ValueError(f"{version_dir / MODEL_FILE} holds no MetaGraphDef")
    graph = next((g for g in graphs if "serve" in g.meta_info_def.tags), graphs[0])
    # The same bytes as the server's own messages (protobuf.py), which the APIs send.
    return {name: protobuf.SignatureDef.FromString(d.SerializeToString()) for name, d in graph.signature_def.items()}


def _direct_call(function):
    """The graph under a one-input, one-output signature as a call of one tensor, or None where TensorFlow does not
    expose it.

    A loaded signature's public call binds its keyword arguments to the structured signature and looks up every
    captured variable again on each call: Python work that does not depend on the request (bench/bench_model_server.py
    measures what it costs). Underneath is one graph function that takes the input tensor and the captured handles,
    which do not change while the version is loaded. That is private TensorFlow API, so TensorFlowVersion.warm_up uses
    it only after it has given the same answer as the public call; a signature with several inputs or outputs always
    takes the public call, where the order of flat tensors would be a guess."""
    graph = getattr(function, "_inference_function", None)
    if graph is None or not hasattr(graph, "call_flat"):
        return None
    captured = list(function.captured_inputs)

    def call(tensor):
        (output,) = graph.call_flat(tensor, *captured)
        return output

    return call


class TensorFlowVersion(ServedVersion):
    """A SavedModel loaded with tf.saved_model.load, its signatures called as TF Serving calls them."""

    def __init__(self, version: int, path: Path):
        super().__init__(version, path)
        self.signature_defs = signature_defs(path)
        self._loaded = tf.saved_model.load(str(path))
        for name, function in self._loaded.signatures.items():
            _, inputs = function.structured_input_signature
            self.signatures[name] = TensorFlowSignature(
                name,
                {alias: _spec(spec) for alias, spec in inputs.items()},
                {alias: _spec(spec) for alias, spec in function.structured_outputs.items()},
                function,
            )

    def run(self, signature: TensorFlowSignature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            if signature.direct is not None:
                ((value,), (alias,)) = inputs.values(), signature.outputs
                return {alias: signature.direct(tf.convert_to_tensor(value)).numpy()}
            outputs = signature.function(**{alias: tf.convert_to_tensor(v) for alias, v in inputs.items()})
        except tf.errors.OpError as e:
            raise ServingError(GRPC_CODE_BY_NUMBER.get(e.error_code, Code.INTERNAL), e.message) from e
        return {alias: tensor.numpy() for alias, tensor in outputs.items()}

    def warm_up(self) -> None:
        """One call of each signature before taking traffic, so that no first client pays for tracing and
        allocation. A one-input, one-output signature then switches to the direct call of its graph if that gives
        the same answer (_direct_call)."""
        for name, signature in list(self.signatures.items()):
            inputs = zero_inputs(signature)
            expected = self.run(signature, inputs)
            if len(signature.inputs) == 1 and len(signature.outputs) == 1:
                self.signatures[name] = self._with_direct_call(signature, inputs, expected)

    def _with_direct_call(self, signature: TensorFlowSignature, inputs: dict, expected: dict) -> TensorFlowSignature:
        call = _direct_call(signature.function)
        if call is None:
            log.info("%s: TensorFlow exposes no direct call of its graph; using the public call", signature.name)
            return signature
        candidate = replace(signature, direct=call)
        try:
            answer = self.run(candidate, inputs)
        except Exception as e:  # whatever the failure, the public call stays
            log.warning("%s: the direct call failed (%s); using the public call", signature.name, e)
            return signature
        ((got,), (want,)) = answer.values(), expected.values()
        same = got.shape == want.shape and (
            np.array_equal(got, want) if want.dtype == object else np.allclose(got, want, equal_nan=True)
        )
        if not same:
            log.warning("%s: the direct call answered differently; using the public call", signature.name)
            return signature
        return candidate
