"""Run model_server.py for a test on free ports, wait until it is SERVING, and always stop it.

    with running_model_server(model_base, enable_batching=True) as server:
        stub = PredictionServiceStub(server.channel())

Keyword arguments become model_server.py flags (`file_system_poll_wait_seconds=0.2` ->
`--file_system_poll_wait_seconds=0.2`); `rest_api_port=0` turns REST off. With `runtime="litert"` the server runs
where TensorFlow cannot be imported (tests/no_tensorflow.py), as in its image.

FakeModelServer is TF Serving's API answering zeros, for tests of the gateway's side of the wire.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

import protobuf
from contract import CLASSES, INPUT_NAME, MODEL_NAME, OUTPUT_NAME, SIGNATURE_NAME, UINT8_SIGNATURE_NAME

ROOT = Path(__file__).resolve().parent.parent
RUNTIMES = ("tensorflow", "litert")  # model_server.py --runtime, for tests that run on both
# Room for a 32-image batch both ways, as the server allows.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningModelServer:
    grpc_target: str  # host:port for grpc.insecure_channel
    rest_url: str | None  # http://host:port, None with REST off
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_target, options=CHANNEL_OPTIONS)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def _flag(name: str, value) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"--{name}={value}"


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def running_model_server(model_base, *, startup_timeout: float = 90, wait_serving: bool = True, **flags):
    """model_server.py serving `model_base` on 127.0.0.1; yields a RunningModelServer once it listens
    (and, with `wait_serving`, once its health check says SERVING)."""
    with tempfile.TemporaryDirectory(prefix="model-server-") as log_dir:
        # The REST port is picked here, so another process may take it first: try again on a new one.
        for attempt in range(3):
            server = _start(Path(model_base), Path(log_dir) / f"server-{attempt}.log", flags)
            try:
                _wait_until_up(server, startup_timeout, wait_serving)
            except _PortTaken:
                continue
            except BaseException:
                terminate(server.process)
                raise
            break
        else:
            raise RuntimeError(f"model_server.py found no free REST port in 3 tries:\n{_tail(server.log())}")
        try:
            yield server
        finally:
            terminate(server.process)


class _PortTaken(Exception):
    pass


def _start(model_base: Path, log_path: Path, flags: dict) -> RunningModelServer:
    options = {"host": "127.0.0.1", "port": 0, "model_name": MODEL_NAME, "model_base_path": model_base, **flags}
    if "rest_api_port" not in flags:
        options["rest_api_port"] = free_port()
    command = [sys.executable, str(ROOT / "model_server.py")]
    if options.get("runtime") == "litert":
        command.insert(1, str(ROOT / "tests" / "no_tensorflow.py"))
    command += [_flag(name, value) for name, value in options.items() if value is not None]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    rest_port = options["rest_api_port"]
    rest_url = f"http://127.0.0.1:{rest_port}" if rest_port else None
    return RunningModelServer(grpc_target="", rest_url=rest_url, process=process, log_path=log_path)


def _wait_until_up(server: RunningModelServer, timeout: float, wait_serving: bool) -> None:
    deadline = time.monotonic() + timeout
    while not server.grpc_target:
        if server.process.poll() is not None:
            text = server.log()
            if "Cannot listen for REST" in text:
                raise _PortTaken()
            raise RuntimeError(f"model_server.py exited with {server.process.returncode}:\n{_tail(text)}")
        # With --port=0 the log line says which port the server got.
        match = re.search(r"gRPC on [\d.]+:(\d+)", server.log())
        if match and (server.rest_url is None or "REST on" in server.log()):
            server.grpc_target = f"127.0.0.1:{match.group(1)}"
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"model_server.py did not listen within {timeout:.0f} s:\n{_tail(server.log())}")
        time.sleep(0.1)
    if not wait_serving:
        return
    with server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.RpcError):
                answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"model_server.py never became SERVING:\n{_tail(server.log())}")
            time.sleep(0.1)


def terminate(process: subprocess.Popen) -> None:
    """SIGTERM, up to 40 s for a graceful exit, then SIGKILL."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class FakeModelServer:
    """TF Serving's Predict, GetModelStatus and GetModelMetadata on 127.0.0.1, answering zeros after `delay` seconds
    (with `cancel_first`, the first calls are answered CANCELLED).

    Its metadata names the course's signature and notebook 01's uint8 one beside it, as the converted model has
    them, so the gateway takes its production path (uint8 pixels). It counts the Predict calls it is working on, and
    the signatures they asked for, so a test can see what reached the model tier.
    """

    def __init__(self, delay: float = 0.0, cancel_first: int = 0):
        self.delay = delay
        self.cancel_first = cancel_first  # Predict calls answered CANCELLED, as by a server stopping under them
        self.calls = self.in_flight = self.peak = 0
        self.signatures: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        service = "tensorflow.serving.{}".format
        handlers = {
            service("PredictionService"): {
                "Predict": grpc.unary_unary_rpc_method_handler(
                    self._predict,
                    request_deserializer=protobuf.PredictRequest.FromString,
                    response_serializer=protobuf.PredictResponse.SerializeToString,
                ),
                "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
                    self._metadata,
                    request_deserializer=protobuf.GetModelMetadataRequest.FromString,
                    response_serializer=protobuf.GetModelMetadataResponse.SerializeToString,
                ),
            },
            service("ModelService"): {
                "GetModelStatus": grpc.unary_unary_rpc_method_handler(
                    self._status,
                    request_deserializer=protobuf.GetModelStatusRequest.FromString,
                    response_serializer=protobuf.GetModelStatusResponse.SerializeToString,
                ),
            },
        }
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(name, methods) for name, methods in handlers.items()]
        )
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self) -> FakeModelServer:
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()  # wakes the calls still sleeping
        self._server.stop(grace=None).wait()

    def _predict(self, request, context):
        with self._lock:
            self.calls += 1
            if self.calls <= self.cancel_first:
                context.abort(grpc.StatusCode.CANCELLED, "the server is stopping")
            self.signatures[request.model_spec.signature_name] += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            self._stopping.wait(self.delay)
            rows = request.inputs[INPUT_NAME].tensor_shape.dim[0].size
            response = protobuf.PredictResponse()
            response.model_spec.name = MODEL_NAME
            response.model_spec.version.value = 1
            logits = np.zeros((rows, len(CLASSES)), dtype=np.float32)
            response.outputs[OUTPUT_NAME].CopyFrom(protobuf.np_to_protobuf(logits))
            return response
        finally:
            with self._lock:
                self.in_flight -= 1

    def _status(self, request, context):
        response = protobuf.GetModelStatusResponse()
        response.model_version_status.add(version=1, state=protobuf.AVAILABLE)
        return response

    def _metadata(self, request, context):
        signatures = protobuf.SignatureDefMap()
        for name, dtype in ((SIGNATURE_NAME, protobuf.DT_FLOAT), (UINT8_SIGNATURE_NAME, protobuf.DT_UINT8)):
            signature = signatures.signature_def[name]
            signature.inputs[INPUT_NAME].CopyFrom(protobuf.TensorInfo(name=f"{INPUT_NAME}:0", dtype=dtype))
            signature.outputs[OUTPUT_NAME].CopyFrom(protobuf.TensorInfo(name="out:0", dtype=protobuf.DT_FLOAT))
        response = protobuf.GetModelMetadataResponse()
        response.model_spec.name = MODEL_NAME
        response.model_spec.version.value = 1
        metadata = response.metadata["signature_def"]
        metadata.type_url, metadata.value = protobuf.SIGNATURE_DEF_MAP_TYPE_URL, signatures.SerializeToString()
        return response
