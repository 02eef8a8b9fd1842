"""The LiteRT runtime: a version is <version>/model.tflite (notebook 01 writes it beside the SavedModel, with the same
signatures), run by LiteRT's interpreter with XNNPACK on the CPU. It imports ai_edge_litert and no TensorFlow, so the
server runs from a small image (dockerfiles/image-model-server-litert.dockerfile), ready in under two seconds."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

import protobuf
from serving.errors import Code, ServingError
from serving.tensors import PREDICT_METHOD_NAME, Signature, TensorSpec
from serving.versions import ServedVersion

log = logging.getLogger("model_server")

MODEL_FILE = "model.tflite"


class LiteRTRuntime:
    name = "LiteRT"
    model_file = MODEL_FILE

    def __init__(self, threads: int = 0):
        # One call uses this many threads (XNNPACK's pool); 0 means one per core, as TensorFlow's default does.
        self.threads = threads or os.cpu_count() or 1
        log.info("LiteRT threads: %d per model call (XNNPACK)", self.threads)

    def load(self, version: int, path: Path) -> LiteRTVersion:
        return LiteRTVersion(version, path, self.threads)


@dataclass(frozen=True)
class LiteRTSignature(Signature):
    runner: object = None  # the interpreter's SignatureRunner


def _spec(details: dict) -> TensorSpec:
    """A tensor of the .tflite signature: -1 in its shape_signature is a size the caller picks (the batch)."""
    shape = tuple(None if d < 0 else int(d) for d in details["shape_signature"])
    return TensorSpec(protobuf.data_type_of(details["dtype"]), shape)


class LiteRTVersion(ServedVersion):
    """A .tflite model in one interpreter. An interpreter runs one call at a time, each on all its threads, so calls
    take turns (a lock): on a CPU that is the fastest order anyway, and the batcher merges what waits."""

    def __init__(self, version: int, path: Path, threads: int):
        super().__init__(version, path)
        self._interpreter = Interpreter(model_path=str(path / MODEL_FILE), num_threads=threads)
        self._lock = threading.Lock()
        for name in self._interpreter.get_signature_list():
            runner = self._interpreter.get_signature_runner(name)
            inputs, outputs = runner.get_input_details(), runner.get_output_details()
            signature = LiteRTSignature(
                name,
                {alias: _spec(d) for alias, d in inputs.items()},
                {alias: _spec(d) for alias, d in outputs.items()},
                runner,
            )
            self.signatures[name] = signature
            self.signature_defs[name] = _signature_def(signature, inputs, outputs)
        if not self.signatures:
            raise ValueError(f"{path / MODEL_FILE} has no signatures: convert it with its signatures (notebook 01)")

    def run(self, signature: LiteRTSignature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            with self._lock:
                # The runner resizes its input tensors when a batch of another size comes, and copies the outputs.
                return signature.runner(**inputs)
        except (RuntimeError, ValueError) as e:
            raise ServingError(Code.INTERNAL, f"LiteRT could not run {signature.name}: {e}") from e


def _signature_def(signature: LiteRTSignature, inputs: dict, outputs: dict) -> protobuf.SignatureDef:
    """The signature as GetModelMetadata shows it, in the SavedModel's form; tensor names are the .tflite file's."""
    signature_def = protobuf.SignatureDef(method_name=PREDICT_METHOD_NAME)
    for alias, spec in signature.inputs.items():
        signature_def.inputs[alias].CopyFrom(spec.tensor_info(inputs[alias]["name"]))
    for alias, spec in signature.outputs.items():
        signature_def.outputs[alias].CopyFrom(spec.tensor_info(outputs[alias]["name"]))
    return signature_def
