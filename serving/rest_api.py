"""TF Serving's RESTful API as a WSGI app: model status, metadata and predict under /v1/models."""

from __future__ import annotations

import base64
import json
import logging
import re
import threading

import numpy as np
from google.protobuf import json_format
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Request, Response

import protobuf
from contract import SIGNATURE_NAME
from serving.errors import HTTP_STATUS, Code, ServingError
from serving.predict import Predictor
from serving.tensors import Signature, TensorSpec
from serving.versions import SIGNATURE_DEF_FIELD, ModelManager, model_metadata

log = logging.getLogger("model_server")

_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)", re.IGNORECASE
)
_STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?", re.I)


def _from_json(alias: str, value, spec: TensorSpec) -> np.ndarray:
    if spec.dtype == protobuf.DT_STRING:
        value = _decode_binary(value)
        return np.array(value, dtype=object)
    try:
        return np.asarray(value, dtype=spec.numpy_dtype)
    except (TypeError, ValueError) as e:
        raise ServingError(
            Code.INVALID_ARGUMENT, f"{alias}: cannot read the JSON value as {spec.dtype_name}: {e}"
        ) from e


def _decode_binary(value):
    # Binary strings travel as {"b64": "..."}, as in TF Serving's REST API.
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode_binary(v) for v in value]
    return value.encode() if isinstance(value, str) else value


def _to_json(alias: str, value: np.ndarray):
    if value.dtype != object:
        return value.tolist()

    # Outputs named *_bytes are binary and go out as base64, the others as text (TF Serving's rule).
    def encode(item):
        if isinstance(item, list):
            return [encode(i) for i in item]
        if alias.endswith("_bytes"):
            return {"b64": base64.b64encode(item).decode()}
        return item.decode("utf-8", "replace")

    return encode(value.tolist())


def _as_dict(message) -> dict:
    """A message as TF Serving's REST API shows it: proto field names, enums by name, every field."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


class RestApi:
    """TF Serving's RESTful API as a WSGI app: status, metadata and predict under /v1/models."""

    def __init__(self, models: ModelManager, predictor: Predictor, max_request_bytes: int):
        self.models = models
        self.predictor = predictor
        self.max_request_bytes = max_request_bytes
        self._in_flight = 0
        self._idle = threading.Condition()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: not self._in_flight, timeout)

    def __call__(self, environ, start_response):
        with self._idle:
            self._in_flight += 1
        try:
            status, body = self._handle(Request(environ))
            response = Response(json.dumps(body), status=status, content_type="application/json")
            return response(environ, start_response)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _handle(self, request: Request) -> tuple[int, dict]:
        try:
            return 200, self._route(request)
        except ServingError as e:
            return HTTP_STATUS.get(e.code, 500), {"error": e.message}
        except RequestEntityTooLarge:
            return 413, {"error": self._too_large(request.content_length)}
        except Exception as e:
            log.exception("Unexpected error in %s %s", request.method, request.path)
            return 500, {"error": f"{type(e).__name__}: {e}"}

    def _too_large(self, size) -> str:
        return (
            f"Request body of {size or 'more than the limit'} bytes is larger than the limit of "
            f"{self.max_request_bytes} bytes (--rest_api_max_request_bytes)"
        )

    def _route(self, request: Request) -> dict:
        path = request.path
        if request.method == "POST" and (match := _PREDICT_PATH.fullmatch(path)):
            name, version, label, method = match.groups()
            if method.lower() != "predict":
                raise ServingError(Code.UNIMPLEMENTED, f"{method} is not supported by this server, only predict")
            if (request.content_length or 0) > self.max_request_bytes:
                raise RequestEntityTooLarge()
            request.max_content_length = self.max_request_bytes
            return self._predict(name, int(version) if version else None, label or "", request.get_data())
        if request.method == "GET" and (match := _STATUS_PATH.fullmatch(path)):
            name, version, label, metadata = match.groups()
            if not name:
                raise ServingError(Code.INVALID_ARGUMENT, "Missing model name in request.")
            version = int(version) if version else None
            if metadata:
                return self._metadata(name, version, label or "")
            if label:
                raise ServingError(Code.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}")
            return _as_dict(self.models.status(name, version))
        if path.lower().startswith("/v1/"):
            raise ServingError(Code.INVALID_ARGUMENT, f"Malformed request: {request.method} {path}")
        raise ServingError(Code.NOT_FOUND, f"Not found: {request.method} {path} (the API is under /v1/models)")

    def _metadata(self, name: str, version: int | None, label: str) -> dict:
        request = protobuf.GetModelMetadataRequest(metadata_field=[SIGNATURE_DEF_FIELD])
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        if label:  # version and version_label are one oneof: setting the label, even empty, drops the version
            request.model_spec.version_label = label
        response = model_metadata(self.models, request)
        signatures = protobuf.SignatureDefMap()
        response.metadata[SIGNATURE_DEF_FIELD].Unpack(signatures)
        # Like TF Serving, the Any is shown as the SignatureDefMap it holds.
        return {"model_spec": _as_dict(response.model_spec), "metadata": {SIGNATURE_DEF_FIELD: _as_dict(signatures)}}

    def _predict(self, name: str, version: int | None, label: str, body: bytes) -> dict:
        try:
            document = json.loads(body)
        except ValueError as e:
            raise ServingError(Code.INVALID_ARGUMENT, f"JSON Parse error: {e}") from e
        if not isinstance(document, dict):
            raise ServingError(Code.INVALID_ARGUMENT, "The request body must be a JSON object")
        signature_name = document.get("signature_name", SIGNATURE_NAME)
        if not isinstance(signature_name, str):
            raise ServingError(Code.INVALID_ARGUMENT, "'signature_name' key must be a string value.")
        if "instances" in document and "inputs" in document:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist",
            )
        if "instances" not in document and "inputs" not in document:
            raise ServingError(Code.INVALID_ARGUMENT, "Missing 'inputs' or 'instances' key")
        row_format = "instances" in document
        with self.predictor.admit(), self.models.use(name, version, label) as served:
            signature = served.signatures.get(signature_name)
            if signature is None:
                raise ServingError(
                    Code.INVALID_ARGUMENT, f'Serving signature name: "{signature_name}" not found in signature def'
                )
            if row_format:
                values = self._rows_to_columns(signature, document["instances"])
            else:
                values = self._columns(signature, document["inputs"])
            self.predictor.check_input_names(signature, values)
            inputs = {alias: _from_json(alias, value, signature.inputs[alias]) for alias, value in values.items()}
            outputs = self.predictor.run(served, signature, inputs, list(signature.outputs))
        if not row_format:
            if len(outputs) == 1:
                return {"outputs": _to_json(*next(iter(outputs.items())))}
            return {"outputs": {alias: _to_json(alias, value) for alias, value in outputs.items()}}
        if len(outputs) == 1:
            return {"predictions": _to_json(*next(iter(outputs.items())))}
        columns = {alias: _to_json(alias, value) for alias, value in outputs.items()}
        if len({len(c) if isinstance(c, list) else -1 for c in columns.values()}) != 1:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                "The outputs do not share their 0th dimension: ask in the columnar ('inputs') format",
            )
        count = len(next(iter(columns.values())))
        return {"predictions": [{alias: column[i] for alias, column in columns.items()} for i in range(count)]}

    @staticmethod
    def _rows_to_columns(signature: Signature, instances) -> dict:
        if not isinstance(instances, list) or not instances:
            raise ServingError(Code.INVALID_ARGUMENT, "'instances' must be a non-empty list")
        named = all(isinstance(i, dict) for i in instances)
        if not named:
            if len(signature.inputs) != 1:
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"The signature has {len(signature.inputs)} inputs: each instance must be an object "
                    f"with the keys {{{','.join(signature.inputs)}}}",
                )
            return {next(iter(signature.inputs)): instances}
        keys = set(instances[0])
        if any(set(i) != keys for i in instances):
            raise ServingError(Code.INVALID_ARGUMENT, "Every instance must have the same named inputs")
        return {key: [i[key] for i in instances] for key in keys}

    @staticmethod
    def _columns(signature: Signature, inputs) -> dict:
        if isinstance(inputs, dict) and not (set(inputs) == {"b64"} and len(signature.inputs) == 1):
            return inputs
        if len(signature.inputs) != 1:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"The signature has {len(signature.inputs)} inputs: 'inputs' must be an object "
                f"with the keys {{{','.join(signature.inputs)}}}",
            )
        return {next(iter(signature.inputs)): inputs}
