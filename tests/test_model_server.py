"""model_server.py against TF Serving's clients: the course's gRPC path, REST, metadata, status, health,
errors, hot reload, batching and graceful shutdown, on both runtimes (TensorFlow, and LiteRT where TensorFlow cannot
be imported), each answering as the SavedModel does in process. Hermetic: the stand-in model, servers on loopback."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

import litert_model
import model_server
from contract import GRPC_PORT, INPUT_NAME, MODEL_NAME, OUTPUT_NAME, REST_PORT, SIGNATURE_NAME
from servers import ROOT, RUNTIMES, running_model_server
from serving.batching import Batcher, BatchingOptions, parse_batching_parameters
from serving.errors import ServingError
from serving.predict import Predictor

TOLERANCE = 1e-5
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


def images(count: int, seed: int = 0) -> np.ndarray:
    """Preprocessed photos as the gateway sends them: float32 in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (count, 299, 299, 3)).astype(np.float32)


def course_request(X: np.ndarray, **model_spec) -> predict_pb2.PredictRequest:
    """The request exactly as the course's notebook builds it."""
    pb_request = predict_pb2.PredictRequest()
    pb_request.model_spec.name = model_spec.pop("name", MODEL_NAME)
    pb_request.model_spec.signature_name = model_spec.pop("signature_name", SIGNATURE_NAME)
    if "version" in model_spec:
        pb_request.model_spec.version.value = model_spec.pop("version")
    pb_request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(X, shape=X.shape))
    return pb_request


def predictions(response: predict_pb2.PredictResponse) -> np.ndarray:
    out = response.outputs[OUTPUT_NAME]
    return np.array(out.float_val, dtype=np.float32).reshape([d.size for d in out.tensor_shape.dim])


def load_reference(version_dir):
    """The SavedModel called in-process: what the server must answer."""
    function = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE_NAME]
    return lambda X: function(**{INPUT_NAME: tf.constant(X)})[OUTPUT_NAME].numpy()


@pytest.fixture(scope="module")
def reference(model_base):
    return load_reference(model_base / "1")


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(model_base, runtime):
    with running_model_server(model_base, runtime=runtime) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server):
    with server.channel() as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def grpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    # TF Serving's codes, never UNKNOWN from an unhandled exception, and no Python traceback.
    assert error.code() != grpc.StatusCode.UNKNOWN, error.details()
    assert "Traceback" not in error.details()
    return error


# ---- gRPC Predict ---------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3])
def test_course_client_matches_in_process(stub, reference, count):
    X = images(count, seed=count)
    pb_response = stub.Predict(course_request(X), timeout=20.0)
    assert np.abs(predictions(pb_response) - reference(X)).max() <= TOLERANCE
    assert len(pb_response.outputs[OUTPUT_NAME].float_val) == count * 10
    assert pb_response.model_spec.name == MODEL_NAME
    assert pb_response.model_spec.version.value == 1
    assert pb_response.model_spec.signature_name == SIGNATURE_NAME


def test_typed_float_val_input_version_and_output_filter(stub, reference):
    X = images(1, seed=5)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.version.value = 1  # signature_name left empty: serving_default
    tensor = request.inputs[INPUT_NAME]
    tensor.dtype = tf.float32.as_datatype_enum
    tensor.tensor_shape.dim.extend(tensor.tensor_shape.Dim(size=d) for d in X.shape)
    tensor.float_val.extend(X.ravel().tolist())
    request.output_filter.append(OUTPUT_NAME)
    response = stub.Predict(request, timeout=20.0)
    assert np.abs(predictions(response) - reference(X)).max() <= TOLERANCE
    assert response.model_spec.signature_name == SIGNATURE_NAME


def test_receives_a_batch_of_32_images(stub, reference):
    X = images(32, seed=32)  # about 34 MB on the wire
    response = stub.Predict(course_request(X), timeout=60.0)
    assert predictions(response).shape == (32, 10)
    assert np.abs(predictions(response) - reference(X)).max() <= TOLERANCE


def test_a_message_over_the_receive_limit_is_refused(stub):
    X = np.zeros((63, 299, 299, 3), np.float32)  # 67.6 MB > the 64 MiB default
    error = grpc_error(lambda: stub.Predict(course_request(X), timeout=60.0))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _wrong_name(request):
    request.inputs["images"].CopyFrom(request.inputs.pop(INPUT_NAME))


def _wrong_dtype(request):
    request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(images(1).astype(np.float64)))


def _wrong_shape(request):
    request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(np.zeros((1, 224, 224, 3), np.float32)))


def _short_content(request):
    request.inputs[INPUT_NAME].tensor_shape.dim[0].size = 2  # says two images, carries one


PREDICT_ERRORS = {
    "unknown model": (
        lambda r: setattr(r.model_spec, "name", "nope"),
        grpc.StatusCode.NOT_FOUND,
        "Servable not found for request: Latest(nope)",
    ),
    "unknown version": (
        lambda r: r.model_spec.version.CopyFrom(r.model_spec.version.__class__(value=7)),
        grpc.StatusCode.NOT_FOUND,
        f"Servable not found for request: Specific({MODEL_NAME}, 7)",
    ),
    # TF Serving answers FAILED_PRECONDITION here (predict_util.cc), not NOT_FOUND.
    "unknown signature": (
        lambda r: setattr(r.model_spec, "signature_name", "nope"),
        grpc.StatusCode.FAILED_PRECONDITION,
        'Serving signature key "nope" not found.',
    ),
    "version label": (
        lambda r: setattr(r.model_spec, "version_label", "stable"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Unrecognized servable version label: stable",
    ),
    "wrong input name": (
        _wrong_name,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"input tensor alias not found in signature: images. Inputs expected to be in the set {{{INPUT_NAME}}}.",
    ),
    "wrong dtype": (
        _wrong_dtype,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{INPUT_NAME}: expected DT_FLOAT but got DT_DOUBLE",
    ),
    "wrong shape": (_wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, f"{INPUT_NAME}: expected shape [-1,299,299,3]"),
    "short tensor_content": (_short_content, grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {INPUT_NAME}"),
    "unknown output": (
        lambda r: r.output_filter.append("dense_8"),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"output tensor alias not found in signature: dense_8 Outputs expected to be in the set {{{OUTPUT_NAME}}}.",
    ),
    "duplicate output": (
        lambda r: r.output_filter.extend([OUTPUT_NAME, OUTPUT_NAME]),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"duplicate output tensor alias: {OUTPUT_NAME}",
    ),
}


@pytest.mark.parametrize("case", PREDICT_ERRORS)
def test_predict_errors_as_tf_serving_gives_them(stub, case):
    change, code, message = PREDICT_ERRORS[case]
    request = course_request(images(1))
    change(request)
    error = grpc_error(lambda: stub.Predict(request, timeout=20.0))
    assert error.code() == code
    assert message in error.details()


# ---- metadata, status, health -----------------------------------------------------------------------


def test_metadata_is_the_signature_def_map(stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL_NAME
    response = stub.GetModelMetadata(request, timeout=20.0)
    assert response.model_spec.name == MODEL_NAME
    assert response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def[SIGNATURE_NAME]
    assert signature.method_name == "tensorflow/serving/predict"
    (input_name,) = signature.inputs
    (output_name,) = signature.outputs
    assert (input_name, output_name) == (INPUT_NAME, OUTPUT_NAME)
    assert signature.inputs[INPUT_NAME].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in signature.inputs[INPUT_NAME].tensor_shape.dim] == [-1, 299, 299, 3]
    assert [d.size for d in signature.outputs[OUTPUT_NAME].tensor_shape.dim] == [-1, 10]


@pytest.mark.parametrize(
    ("fields", "name", "code", "message"),
    [
        ([], MODEL_NAME, "INVALID_ARGUMENT", "GetModelMetadataRequest must specify at least one metadata_field"),
        (["signature_def", "labels"], MODEL_NAME, "INVALID_ARGUMENT", "Metadata field labels is not supported"),
        (["signature_def"], "nope", "NOT_FOUND", "Servable not found for request: Latest(nope)"),
    ],
)
def test_metadata_errors(stub, fields, name, code, message):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
    request.model_spec.name = name
    error = grpc_error(lambda: stub.GetModelMetadata(request, timeout=20.0))
    assert (error.code().name, error.details()) == (code, message)


def test_model_status(channel):
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL_NAME
    (status,) = models.GetModelStatus(request, timeout=20.0).model_version_status
    assert (status.version, status.state, status.status.error_code, status.status.error_message) == (
        1,
        AVAILABLE,
        0,
        "",
    )

    request.model_spec.version.value = 1
    assert models.GetModelStatus(request, timeout=20.0).model_version_status[0].version == 1
    request.model_spec.version.value = 7
    error = grpc_error(lambda: models.GetModelStatus(request, timeout=20.0))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"Could not find version 7 of model {MODEL_NAME}",
    )
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "nope"
    error = grpc_error(lambda: models.GetModelStatus(request, timeout=20.0))
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "Could not find any versions of model nope")


def test_health(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tensorflow.serving.PredictionService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=20.0)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    error = grpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=20.0))
    assert error.code() == grpc.StatusCode.NOT_FOUND


# ---- REST ---------------------------------------------------------------------------------------------


def test_rest_status_and_metadata(server):
    expected = {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    for path in (f"/v1/models/{MODEL_NAME}", f"/v1/models/{MODEL_NAME}/versions/1"):
        answer = requests.get(server.rest_url + path, timeout=20)
        assert (answer.status_code, answer.json()) == (200, expected)
        assert answer.headers["Content-Type"] == "application/json"

    metadata = requests.get(f"{server.rest_url}/v1/models/{MODEL_NAME}/metadata", timeout=20).json()
    assert metadata["model_spec"] == {"name": MODEL_NAME, "signature_name": "", "version": "1"}
    signature = metadata["metadata"]["signature_def"]["signature_def"][SIGNATURE_NAME]
    tensor = signature["inputs"][INPUT_NAME]
    assert tensor["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in tensor["tensor_shape"]["dim"]] == ["-1", "299", "299", "3"]
    assert [d["size"] for d in signature["outputs"][OUTPUT_NAME]["tensor_shape"]["dim"]] == ["-1", "10"]


@pytest.mark.parametrize(
    ("path", "body", "key"),
    [
        (f"/v1/models/{MODEL_NAME}:predict", lambda X: {"instances": X.tolist()}, "predictions"),
        (
            f"/v1/models/{MODEL_NAME}/versions/1:predict",
            lambda X: {"instances": [{INPUT_NAME: x} for x in X.tolist()]},
            "predictions",
        ),
        (f"/v1/models/{MODEL_NAME}:predict", lambda X: {"inputs": {INPUT_NAME: X.tolist()}}, "outputs"),
        (
            f"/v1/models/{MODEL_NAME}:predict",
            lambda X: {"signature_name": SIGNATURE_NAME, "inputs": X.tolist()},
            "outputs",
        ),
    ],
    ids=["rows", "named rows, version", "columns", "bare columns"],
)
def test_rest_predict(server, reference, path, body, key):
    X = images(2, seed=7)
    answer = requests.post(server.rest_url + path, json=body(X), timeout=60)
    assert answer.status_code == 200, answer.text
    assert np.abs(np.array(answer.json()[key], np.float32) - reference(X)).max() <= TOLERANCE


SMALL_WRONG = {"instances": [[[[0.0, 0.0, 0.0]]]]}

REST_ERRORS = [
    ("POST", "/v1/models/nope:predict", SMALL_WRONG, 404, "Servable not found for request: Latest(nope)"),
    ("POST", f"/v1/models/{MODEL_NAME}/versions/7:predict", SMALL_WRONG, 404, f"Specific({MODEL_NAME}, 7)"),
    (
        "POST",
        f"/v1/models/{MODEL_NAME}:predict",
        {"signature_name": "nope", **SMALL_WRONG},
        400,
        'Serving signature name: "nope" not found in signature def',
    ),
    ("POST", f"/v1/models/{MODEL_NAME}:predict", b"{not json", 400, "JSON Parse error"),
    (
        "POST",
        f"/v1/models/{MODEL_NAME}:predict",
        {"instances": [1], "inputs": [1]},
        400,
        "only one of 'inputs' or 'instances'",
    ),
    ("POST", f"/v1/models/{MODEL_NAME}:predict", {"examples": []}, 400, "Missing 'inputs' or 'instances' key"),
    (
        "POST",
        f"/v1/models/{MODEL_NAME}:predict",
        {"inputs": {INPUT_NAME: [1.0], "images": [1.0]}},
        400,
        "Sent extra: {images}. Missing but required: {}.",
    ),
    (
        "POST",
        f"/v1/models/{MODEL_NAME}:predict",
        {"inputs": {"images": [1.0]}},
        400,
        "alias not found in signature: images",
    ),
    ("POST", f"/v1/models/{MODEL_NAME}:predict", SMALL_WRONG, 400, f"{INPUT_NAME}: expected shape [-1,299,299,3]"),
    ("POST", f"/v1/models/{MODEL_NAME}:predict", {"instances": [["a"]]}, 400, f"{INPUT_NAME}: cannot read"),
    ("POST", f"/v1/models/{MODEL_NAME}:classify", {"examples": []}, 501, "only predict"),
    ("GET", f"/v1/models/{MODEL_NAME}/versions/7", None, 404, f"Could not find version 7 of model {MODEL_NAME}"),
    ("GET", "/v1/models", None, 400, "Missing model name in request."),
    ("GET", "/v1/nothing", None, 400, "Malformed request: GET /v1/nothing"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), REST_ERRORS)
def test_rest_errors(server, method, path, body, status, message):
    data = body if isinstance(body, bytes) else json.dumps(body) if body is not None else None
    answer = requests.request(method, server.rest_url + path, data=data, timeout=20)
    assert answer.status_code == status
    assert message in answer.json()["error"]


def test_rest_request_size_limit(server):
    host, port = server.rest_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        # Only the headers: the server must refuse on the declared size, before reading a body.
        connection.putrequest("POST", f"/v1/models/{MODEL_NAME}:predict")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(65 * 1024 * 1024))
        connection.endheaders()
        answer = connection.getresponse()
        assert answer.status == 413
        assert "--rest_api_max_request_bytes" in json.loads(answer.read())["error"]
    finally:
        connection.close()


# ---- versions: hot reload ------------------------------------------------------------------------------


class OtherModel(tf.Module):
    """A different model with the same signature, for version 2."""

    def __init__(self):
        super().__init__()
        self.kernel = tf.Variable(tf.random.stateless_normal([3, 10], seed=[2, 2]))

    @tf.function(input_signature=[tf.TensorSpec([None, 299, 299, 3], tf.float32, name=INPUT_NAME)])
    def serve(self, input_8):
        return {OUTPUT_NAME: tf.matmul(tf.reduce_mean(input_8, axis=[1, 2]), self.kernel)}


def status_of(channel) -> dict[int, int]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL_NAME
    answer = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=20.0)
    return {s.version: s.state for s in answer.model_version_status}


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def half_written(runtime: str, staged) -> list[tuple[str, bytes]]:
    """Two broken states of version 2, (file, its bytes), each a failed load with its own error: a truncated model
    file, then the SavedModel's graph without its variables, or a .tflite file of the full size, its header followed
    by zeros."""
    if runtime == "litert":
        model = (staged / litert_model.MODEL_FILE).read_bytes()
        zeros = model[:8] + bytes(len(model) - 8)
        return [(litert_model.MODEL_FILE, model[: len(model) // 2]), (litert_model.MODEL_FILE, zeros)]
    graph = (staged / "saved_model.pb").read_bytes()
    return [("saved_model.pb", graph[: len(graph) // 2]), ("saved_model.pb", graph)]


def test_new_version_is_served_without_a_failed_request(model_base, reference, runtime, tmp_path):
    base = tmp_path / MODEL_NAME
    shutil.copytree(model_base / "1", base / "1")
    staged = tmp_path / "staged"
    other = OtherModel()
    tf.saved_model.save(other, str(staged), signatures={SIGNATURE_NAME: other.serve})
    litert_model.write_model({SIGNATURE_NAME: other.serve}, other, staged)
    reference_2 = load_reference(staged)
    X = images(1, seed=11)
    expected = {1: reference(X), 2: reference_2(X)}

    answers: list[list[int]] = [[] for _ in range(3)]
    failures: list[str] = []
    stop = threading.Event()

    def hammer(seen: list[int], stub) -> None:
        while not stop.is_set():
            try:
                response = stub.Predict(course_request(X), timeout=30.0)
            except grpc.RpcError as e:
                failures.append(f"{e.code()}: {e.details()}")
                continue
            version = response.model_spec.version.value
            if np.abs(predictions(response) - expected[version]).max() > TOLERANCE:
                failures.append(f"version {version} answered something else")
            seen.append(version)

    # Debug: the server says each time a poll finds the failed version unchanged.
    polled = running_model_server(base, runtime=runtime, file_system_poll_wait_seconds=0.2, log_level="debug")
    with polled as server, server.channel() as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        threads = [threading.Thread(target=hammer, args=(seen, stub)) for seen in answers]
        for thread in threads:
            thread.start()
        try:
            (base / "2").mkdir()
            (first_name, first), (second_name, second) = half_written(runtime, staged)
            (base / "2" / first_name).write_bytes(first)
            wait_for(lambda: "Could not load version 2" in server.log(), 30, "a first try at version 2")
            wait_for(lambda: server.log().count("files have not changed") >= 5, 30, "five more polls")
            assert status_of(channel).get(1) == AVAILABLE
            assert status_of(channel).get(2) != AVAILABLE
            assert server.log().count("Could not load version 2") == 1  # logged once, not once a poll
            (base / "2" / second_name).write_bytes(second)
            wait_for(
                lambda: server.log().count("Could not load version 2") == 2, 30, "a try at the second broken state"
            )
            assert status_of(channel).get(2) != AVAILABLE

            shutil.copytree(staged, base / "2", dirs_exist_ok=True)
            wait_for(lambda: status_of(channel) == {2: AVAILABLE, 1: END}, 60, "version 2 served, 1 unloaded")
            wait_for(lambda: all(seen and seen[-1] == 2 for seen in answers), 30, "answers from version 2")
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert failures == []
        for seen in answers:
            assert seen[0] == 1
            switch = seen.index(2)
            assert set(seen[switch:]) == {2}  # once switched, never back
        assert server.stop(signal.SIGINT) == 0


# ---- batching -------------------------------------------------------------------------------------------


def test_batching_gives_each_caller_its_own_rows(model_base, reference, runtime, tmp_path):
    parameters = tmp_path / "batching.config"
    parameters.write_text(
        "max_batch_size { value: 8 }\nbatch_timeout_micros { value: 50000 }\n"
        "max_enqueued_batches { value: 8 }\nnum_batch_threads { value: 1 }\n"
    )
    callers, rounds = 6, 4
    inputs = {(c, r): images(1 + c % 3, seed=100 + 10 * c + r) for c in range(callers) for r in range(rounds)}
    barrier = threading.Barrier(callers)
    with (
        running_model_server(
            model_base, runtime=runtime, enable_batching=True, batching_parameters_file=parameters, log_level="debug"
        ) as server,
        server.channel() as channel,
    ):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def caller(c: int) -> list[np.ndarray]:
            answers = []
            for r in range(rounds):
                barrier.wait(timeout=60)
                answers.append(predictions(stub.Predict(course_request(inputs[c, r]), timeout=60.0)))
            return answers

        with futures.ThreadPoolExecutor(callers) as pool:
            results = list(pool.map(caller, range(callers)))
        log = server.log()
    for c, answers in enumerate(results):
        for r, answer in enumerate(answers):
            assert answer.shape == (1 + c % 3, 10)
            assert np.abs(answer - reference(inputs[c, r])).max() <= TOLERANCE
    merged = [int(n) for n in re.findall(r"Ran a batch of \d+ rows from (\d+) requests", log)]
    assert max(merged) > 1, "no two requests were ever merged"


def test_batcher_queue_is_bounded():
    options = BatchingOptions(max_batch_size=2, batch_timeout_micros=0, max_enqueued_batches=1, num_batch_threads=1)
    batcher = Batcher(options)
    batcher.start()
    entered, release = threading.Event(), threading.Event()

    def run(merged):
        entered.set()
        release.wait(timeout=30)
        return {"y": merged["x"] * 2}

    def submit(rows: int, start: float):
        x = np.arange(start, start + rows, dtype=np.float32)
        return batcher.submit(("key",), rows, {"x": x}, run)

    with futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(submit, 2, 0)  # taken by the batch thread, which then blocks
        assert entered.wait(timeout=10)
        queued = pool.submit(submit, 2, 10)  # fills the queue: 1 batch of 2 rows
        wait_for(lambda: batcher.queued_rows == 2, 10, "the second request to queue")
        with pytest.raises(ServingError) as full:
            submit(1, 20)
        assert full.value.code == grpc.StatusCode.UNAVAILABLE
        assert full.value.message == "The batch scheduling queue to which this task was submitted is full"
        with pytest.raises(ServingError) as too_big:
            submit(3, 30)
        assert too_big.value.code == grpc.StatusCode.INVALID_ARGUMENT
        release.set()
        assert running.result(timeout=30)["y"].tolist() == [0, 2]
        assert queued.result(timeout=30)["y"].tolist() == [20, 22]
    batcher.close()


def test_a_full_server_refuses_at_once_with_unavailable():
    predictor = Predictor(None, max_requests=1)
    with predictor.admit():
        with pytest.raises(ServingError) as full, predictor.admit():
            pass
        assert full.value.code == grpc.StatusCode.UNAVAILABLE
        assert "--max_concurrent_requests=1" in full.value.message
    with predictor.admit():  # the slot came back
        pass


def test_past_its_limit_the_server_answers_unavailable_quickly_never_by_timing_out(model_base, reference, runtime):
    X = images(16, seed=3)
    start = threading.Barrier(8)

    def call(stub):
        start.wait()
        began = time.monotonic()
        try:
            return predictions(stub.Predict(course_request(X), timeout=30)), time.monotonic() - began
        except grpc.RpcError as error:
            return error, time.monotonic() - began

    with (
        running_model_server(model_base, runtime=runtime, max_concurrent_requests=1, rest_api_port=0) as server,
        server.channel() as channel,
    ):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        stub.Predict(course_request(X[:1]), timeout=30)  # warm
        with futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: call(stub), range(8)))
    refused = [(a, t) for a, t in answers if isinstance(a, grpc.RpcError)]
    served = [a for a, _ in answers if not isinstance(a, grpc.RpcError)]
    assert served and refused, f"{len(served)} served, {len(refused)} refused"
    for error, seconds in refused:
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "at capacity" in error.details()
        assert seconds < 2
    for answer in served:
        assert np.abs(answer - reference(X)).max() <= TOLERANCE


def test_batching_parameters_file_format():
    text = (ROOT / "dockerfiles" / "batching.config").read_text()
    options = parse_batching_parameters(text)
    assert (options.max_batch_size, options.batch_timeout_micros) == (8, 2000)
    assert (options.max_enqueued_batches, options.num_batch_threads) == (64, 2)
    assert parse_batching_parameters("max_batch_size: 4").max_batch_size == 4
    with pytest.raises(ValueError, match="max_batch_size"):
        parse_batching_parameters("max_batch_size { value: many }")


# ---- graceful shutdown ------------------------------------------------------------------------------------


def test_sigterm_lets_in_flight_requests_finish(model_base, reference, runtime, tmp_path):
    # A batch that would wait a minute for more requests holds them inside the server; on SIGTERM the
    # server runs it at once, answers, and exits.
    parameters = tmp_path / "batching.config"
    parameters.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 60000000 }\n")
    count = 5
    with (
        running_model_server(
            model_base, runtime=runtime, enable_batching=True, batching_parameters_file=parameters, log_level="debug"
        ) as server,
        server.channel() as channel,
    ):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        X = images(count, seed=3)
        with futures.ThreadPoolExecutor(count) as pool:
            calls = [pool.submit(stub.Predict, course_request(X[i : i + 1]), timeout=60.0) for i in range(count)]
            wait_for(lambda: server.log().count("Queued 1 rows") == count, 30, "all requests inside the server")
            assert not any(call.done() for call in calls)
            server.process.send_signal(signal.SIGTERM)
            answers = [predictions(call.result(timeout=30)) for call in calls]
        assert server.process.wait(timeout=30) == 0
        assert "SIGTERM: stopping" in server.log()
    assert np.abs(np.concatenate(answers) - reference(X)).max() <= TOLERANCE


# ---- command line ---------------------------------------------------------------------------------------


def test_flags_and_environment_as_tf_serving(monkeypatch):
    # The tensorflow/serving image serves $MODEL_BASE_PATH/$MODEL_NAME; flags win over the environment.
    monkeypatch.setenv("MODEL_NAME", "other")
    monkeypatch.setenv("MODEL_BASE_PATH", "/models")
    args = model_server.parse_args([])
    assert (args.model_name, args.model_base_path) == ("other", "/models/other")
    assert (args.port, args.rest_api_port, args.enable_batching) == (GRPC_PORT, REST_PORT, False)
    args = model_server.parse_args(
        [f"--model_name={MODEL_NAME}", "--model_base_path=models/x", "--enable_batching", "--rest_api_port=0"]
    )
    assert (args.model_name, args.model_base_path) == (MODEL_NAME, "models/x")
    assert (args.enable_batching, args.rest_api_port) == (True, 0)
    assert model_server.parse_args(["--enable_batching=false"]).enable_batching is False
    # The Kubernetes manifests pass TF Serving's server arguments; this server takes them the same way.
    args = model_server.parse_args(["--grpc_channel_arguments=grpc.max_connection_age_ms=60000,grpc.x=a"])
    assert args.grpc_channel_arguments == [("grpc.max_connection_age_ms", 60000), ("grpc.x", "a")]
    with pytest.raises(SystemExit):
        model_server.parse_args(["--grpc_channel_arguments=no-equals-sign"])
    args = model_server.parse_args(["--max_concurrent_requests=40"])
    assert args.grpc_max_threads == 40 + model_server.SPARE_GRPC_THREADS
    assert model_server.parse_args([]).runtime == "tensorflow"  # TF Serving's own runtime stays the default
    monkeypatch.setenv("MODEL_RUNTIME", "litert")
    assert model_server.parse_args([]).runtime == "litert"
    assert model_server.parse_args(["--runtime=tensorflow"]).runtime == "tensorflow"
    with pytest.raises(SystemExit):
        model_server.parse_args(["--runtime=onnx"])


TF_THREADS = """
import tensorflow as tf
from serving.errors import StartupError
from serving.runtime_tensorflow import set_tensorflow_threads
set_tensorflow_threads(1, 2)
tf.constant(1.0) + 1  # TensorFlow runs: its thread pools are made now
print(tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads())
try:
    set_tensorflow_threads(2, 0)
except StartupError as e:
    print(e)
"""


def test_tensorflow_threads_as_tf_serving():
    # TF Serving's thread flags; 0 (the default) leaves TensorFlow's choice.
    args = model_server.parse_args(["--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=2"])
    assert (args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism) == (1, 2)
    assert model_server.parse_args([]).tensorflow_intra_op_parallelism == 0
    with pytest.raises(SystemExit):
        model_server.parse_args(["--tensorflow_intra_op_parallelism=-1"])
    # Set before TensorFlow runs, in a process of its own (TensorFlow already ran in this one); once it ran, a
    # clear start-up error instead of a setting silently ignored.
    run = subprocess.run(
        [sys.executable, "-c", TF_THREADS], cwd=ROOT, capture_output=True, text=True, timeout=180, check=True
    )
    lines = run.stdout.splitlines()
    assert lines[0] == "1 2", run.stderr[-2000:]
    assert lines[1].startswith("cannot set TensorFlow's threads:"), run.stdout


def test_the_server_runs_with_the_tensorflow_threads_its_flags_ask_for(model_base):
    """main() applies the flags before TensorFlow runs: the server reads the values back from TensorFlow."""
    flags = {"tensorflow_intra_op_parallelism": 1, "tensorflow_inter_op_parallelism": 2, "rest_api_port": 0}
    with running_model_server(model_base, **flags) as server:
        log = server.log()
    assert "TensorFlow threads: 1 per operation, 2 for operations at once" in log, log[-2000:]


def test_the_litert_server_runs_with_the_threads_its_flag_asks_for(model_base):
    flags = {"runtime": "litert", "tensorflow_intra_op_parallelism": 1, "rest_api_port": 0}
    with running_model_server(model_base, **flags) as server:
        log = server.log()
    assert "LiteRT threads: 1 per model call" in log and f"Serving {MODEL_NAME} version 1" in log, log[-2000:]
    assert "with LiteRT" in log and "signature serving_uint8: input_8 uint8[-1,299,299,3]" in log, log[-2000:]


def test_the_tensorflow_runtime_cannot_start_where_tensorflow_cannot_be_imported(model_base):
    """tests/no_tensorflow.py blocks TensorFlow for real: the LiteRT runs above prove the server runs without it."""
    command = [sys.executable, str(ROOT / "tests" / "no_tensorflow.py"), str(ROOT / "model_server.py")]
    run = subprocess.run(
        [*command, f"--model_base_path={model_base}", "--port=0", "--rest_api_port=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "ModuleNotFoundError: import of tensorflow halted" in run.stderr, run.stderr[-2000:]


def test_the_litert_server_says_what_a_base_path_should_hold(tmp_path):
    command = [sys.executable, str(ROOT / "tests" / "no_tensorflow.py"), str(ROOT / "model_server.py")]
    run = subprocess.run(
        [*command, "--runtime=litert", f"--model_base_path={tmp_path / 'nowhere'}", "--port=0", "--rest_api_port=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "numbered versions for LiteRT (<base>/1/model.tflite)" in run.stderr, run.stderr[-2000:]
