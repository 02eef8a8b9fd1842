"""A local TensorFlow Serving: serves a SavedModel over TF Serving's gRPC and REST APIs.

TF Serving ships only as an x86-64 Docker image, so it does not run natively on Apple Silicon nor
without Docker. This server speaks the same APIs on the same ports, so every TF Serving client (the
course notebook, the gateway, curl) works against it unchanged:

    python model_server.py --model_name=clothing-model --model_base_path=models/clothing-model

In Docker, Compose and Kubernetes the real `tensorflow/serving` image stays the model tier; this one is
for local runs, notebooks and tests. Like TF Serving it serves the highest integer version under the
base path, picks up a new one without a restart, batches requests when asked to, and drains in-flight
requests on SIGTERM. It does not do Classify, Regress or MultiInference, model config files, version
labels or several models at once.
"""

from __future__ import annotations

import os

# TensorFlow's C++ start-up chatter would bury this server's own log lines; a value the user set wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import base64
import collections
import contextlib
import json
import logging
import re
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from contract import GRPC_PORT, MODEL_BASE_PATH, MODEL_NAME, REST_PORT, SIGNATURE_NAME

log = logging.getLogger("model_server")

ROOT = Path(__file__).resolve().parent
MIB = 1024 * 1024
# A batch of 32 images at 299x299x3 float32 is about 34 MB; TF Serving itself takes up to 2 GB.
DEFAULT_MAX_MESSAGE_BYTES = 64 * MIB
# Predict requests held at once: several gateways' worth (each sends at most GATEWAY_MAX_INFLIGHT per worker).
DEFAULT_MAX_REQUESTS = 32
SPARE_GRPC_THREADS = 8
SIGNATURE_DEF_FIELD = "signature_def"  # the one GetModelMetadata field TF Serving knows
SERVICE_NAMES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")

State = get_model_status_pb2.ModelVersionStatus.State
Code = grpc.StatusCode
# tensorflow.error.Code and grpc.StatusCode share their numbers.
GRPC_CODE_BY_NUMBER = {code.value[0]: code for code in Code}
# TF Serving's mapping of status codes to HTTP (model_servers/http_server.cc).
HTTP_STATUS = {
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}
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


class ServingError(Exception):
    """An error for the client, with the status code TF Serving gives for it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class StartupError(Exception):
    """A problem the user has to fix before the server can start."""


def _shape_text(shape) -> str:
    if shape.rank is None:
        return "[?]"
    return "[" + ",".join("-1" if d is None else str(d) for d in shape.as_list()) + "]"


def _dtype_name(enum: int) -> str:
    try:
        return types_pb2.DataType.Name(enum)
    except ValueError:
        return f"dtype {enum}"


# ---- the model: versions on disk, loading, hot swap --------------------------------------------


@dataclass(frozen=True)
class Signature:
    name: str
    function: object  # the loaded ConcreteFunction
    inputs: dict[str, tf.TensorSpec]
    outputs: dict[str, tf.TensorSpec]

    def describe(self) -> str:
        def specs(tensors):
            return ", ".join(f"{k} {s.dtype.name}{_shape_text(s.shape)}" for k, s in tensors.items())

        return f"signature {self.name}: {specs(self.inputs)} -> {specs(self.outputs)}"


def _read_meta_graph(version_dir: Path) -> meta_graph_pb2.MetaGraphDef:
    """The serving MetaGraphDef, whose signature_def map is what GetModelMetadata returns."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    graphs = list(saved_model.meta_graphs)
    if not graphs:
        raise ValueError(f"{version_dir / 'saved_model.pb'} holds no MetaGraphDef")
    return next((g for g in graphs if "serve" in g.meta_info_def.tags), graphs[0])


class ServedVersion:
    """One loaded version. Requests hold it while they use it, so it is unloaded only once idle."""

    def __init__(self, version: int, path: Path):
        self.version = version
        self.path = path
        self.signature_defs = _read_meta_graph(path).signature_def
        self._loaded = tf.saved_model.load(str(path))
        self.signatures = {}
        for name, function in self._loaded.signatures.items():
            _, inputs = function.structured_input_signature
            self.signatures[name] = Signature(name, function, dict(inputs), dict(function.structured_outputs))
        self._in_flight = 0
        self._idle = threading.Condition()

    def run(self, signature: Signature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = signature.function(**{alias: tf.convert_to_tensor(v) for alias, v in inputs.items()})
        except tf.errors.OpError as e:
            raise ServingError(GRPC_CODE_BY_NUMBER.get(e.error_code, Code.INTERNAL), e.message) from e
        return {alias: tensor.numpy() for alias, tensor in outputs.items()}

    def warm_up(self) -> None:
        """One call of each signature before taking traffic, so that no first client pays for tracing and
        allocation, whichever signature it asks for (the gateway sends uint8 pixels to a second one)."""
        for signature in self.signatures.values():
            inputs = {}
            for alias, spec in signature.inputs.items():
                shape = [] if spec.shape.rank is None else [1 if d is None else d for d in spec.shape.as_list()]
                inputs[alias] = np.full(shape, b"" if spec.dtype == tf.string else 0, spec.dtype.as_numpy_dtype)
            self.run(signature, inputs)

    def hold(self) -> None:
        with self._idle:
            self._in_flight += 1

    def release(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def wait_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: not self._in_flight)


def _files_of(directory: Path) -> tuple:
    """Names, sizes and modification times of every file under `directory`: changes while it is written."""
    files = []
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):  # a file removed while we look is simply not there
            if path.is_file():
                stat = path.stat()
                files.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(files))


class ModelManager:
    """Serves the highest integer version under the base path and follows it as new ones appear."""

    def __init__(self, name: str, base_path: Path, poll_seconds: float, on_available=None):
        self.name = name
        self.base_path = base_path
        self.poll_seconds = poll_seconds
        self._on_available = on_available or (lambda: None)
        self._lock = threading.Lock()
        self._current: ServedVersion | None = None
        self._states: dict[int, tuple[int, str]] = {}  # version -> (ModelVersionStatus.State, error)
        self._failures: dict[int, tuple] = {}  # version -> (its files, the error) at the last failed load
        self._warned_empty = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> ServedVersion | None:
        return self._current

    def versions_on_disk(self) -> list[int]:
        if not self.base_path.is_dir():  # removed while serving: keep what is loaded
            return []
        # TF Serving takes directories whose whole name is a number, and ignores everything else.
        return [int(p.name) for p in self.base_path.iterdir() if p.is_dir() and p.name.isdigit()]

    def poll(self) -> None:
        """Load the highest version if it is not the one served, then swap and unload the old one."""
        versions = self.versions_on_disk()
        if not versions:
            if not self._warned_empty:
                log.warning("No versions of servable %s found under base path %s", self.name, self.base_path)
                self._warned_empty = True
            return
        self._warned_empty = False
        target = max(versions)
        served = self._current
        if served is not None and served.version == target:
            return
        path = self.base_path / str(target)
        if not (path / "saved_model.pb").is_file():
            log.debug("Version %d has no saved_model.pb yet: still being written?", target)
            return
        # Taken before loading: files that change during a failed load still count as a change.
        files = _files_of(path)
        last_files, last_error = self._failures.get(target, ((), ""))
        if files == last_files:
            return
        with self._lock:
            self._states[target] = (State.LOADING, "")
        started = time.monotonic()
        try:
            new = ServedVersion(target, path)
        except Exception as e:  # half-written or broken: keep serving the old one, retry once files change
            error = f"{type(e).__name__}: {e}"
            with self._lock:
                self._states[target] = (State.END, error)
            if error != last_error:
                log.error("Could not load version %d from %s (retried when its files change): %s", target, path, error)
            self._failures[target] = (files, error)
            return
        self._failures.pop(target, None)
        try:
            new.warm_up()
        except Exception as e:  # some models cannot run on zeros; they still serve real inputs
            log.warning("Warm-up call on version %d failed (serving it anyway): %s", target, e)
        with self._lock:
            old, self._current = self._current, new
            self._states[target] = (State.AVAILABLE, "")
            if old is not None:
                self._states[old.version] = (State.UNLOADING, "")
        log.info(
            "Serving %s version %d from %s (%s) - loaded in %.1f s",
            self.name,
            target,
            path,
            "; ".join(s.describe() for s in new.signatures.values()) or "no signatures",
            time.monotonic() - started,
        )
        self._on_available()
        if old is not None:
            old.wait_idle()
            with self._lock:
                self._states[old.version] = (State.END, "")
            log.info("Unloaded %s version %d", self.name, old.version)

    def start_polling(self) -> None:
        if self.poll_seconds <= 0:  # as in TF Serving: poll once, at start-up
            return
        self._thread = threading.Thread(target=self._poll_loop, name="version-poller", daemon=True)
        self._thread.start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:
                log.exception("Polling %s for new versions failed", self.base_path)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _not_found(self, name: str, version: int | None) -> ServingError:
        request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
        return ServingError(Code.NOT_FOUND, f"Servable not found for request: {request}")

    @contextlib.contextmanager
    def use(self, name: str, version: int | None, label: str = ""):
        """The version a request asks for, held until the request is done with it."""
        if label:
            raise ServingError(Code.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}")
        with self._lock:
            served = self._current
            if name != self.name or served is None or version not in (None, served.version):
                raise self._not_found(name, version)
            served.hold()
        try:
            yield served
        finally:
            served.release()

    def status(self, name: str, version: int | None) -> get_model_status_pb2.GetModelStatusResponse:
        with self._lock:
            states = dict(self._states) if name == self.name else {}
        if version is not None:
            if version not in states:
                raise ServingError(Code.NOT_FOUND, f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        if not states:
            raise ServingError(Code.NOT_FOUND, f"Could not find any versions of model {name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in sorted(states, reverse=True):  # newest first, as TF Serving lists them
            state, error = states[v]
            entry = response.model_version_status.add(version=v, state=state)
            entry.status.SetInParent()
            if error:
                entry.status.error_code = Code.UNKNOWN.value[0]
                entry.status.error_message = error
        return response


# ---- dynamic batching ---------------------------------------------------------------------------


@dataclass
class BatchingOptions:
    # TF Serving's defaults for a batching_parameters_file that leaves a field out.
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)


_BATCHING_INT_FIELDS = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")
_TEXT_FIELD = re.compile(r'\s*(\w+)\s*(?:\{\s*value\s*:\s*("[^"]*"|[^\s{}]+)\s*\}|:\s*("[^"]*"|[^\s{}]+))\s*')


def parse_batching_parameters(text: str) -> BatchingOptions:
    """TF Serving's BatchingParameters in protobuf text format, e.g. `max_batch_size { value: 32 }`."""
    options = BatchingOptions()
    text = re.sub(r"#[^\n]*", "", text)
    position = 0
    while position < len(text.rstrip()):
        match = _TEXT_FIELD.match(text, position)
        if not match:
            raise ValueError(f"cannot parse {text[position:].strip()[:40]!r}: expected `name {{ value: N }}`")
        position = match.end()
        name, value = match.group(1), match.group(2) or match.group(3)
        if name not in _BATCHING_INT_FIELDS:
            log.warning("Batching parameter %s is not supported by this server: ignored", name)
            continue
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, not {value}") from None
        if number < (0 if name == "batch_timeout_micros" else 1):
            raise ValueError(f"{name} must be positive, not {number}")
        setattr(options, name, number)
    return options


@dataclass
class _Task:
    key: tuple
    rows: int
    inputs: dict[str, np.ndarray]
    run: object  # callable: merged inputs -> outputs
    enqueued: float
    future: futures.Future = field(default_factory=futures.Future)


class Batcher:
    """Merges concurrent requests into one model call, as TF Serving's --enable_batching does.

    A batch closes when it holds max_batch_size rows or its first request has waited
    batch_timeout_micros; only requests for the same version, signature and row shape are merged.
    At most max_enqueued_batches batches wait, so overload is answered at once instead of queued.
    """

    def __init__(self, options: BatchingOptions):
        self.options = options
        self._capacity = options.max_batch_size * options.max_enqueued_batches
        self._tasks: collections.deque[_Task] = collections.deque()
        self._queued_rows = 0
        self._cv = threading.Condition()
        self._draining = False  # shutting down: no batch waits for more requests
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def drain(self) -> None:
        """From now on run every batch at once: on shutdown no more requests are coming to fill it."""
        with self._cv:
            self._draining = True
            self._cv.notify_all()

    def close(self) -> None:
        """Run what is queued, then stop the batch threads."""
        with self._cv:
            self._draining = self._closed = True
            self._cv.notify_all()
        for thread in self._threads:
            thread.join()

    def submit(self, key: tuple, rows: int, inputs: dict[str, np.ndarray], run) -> dict[str, np.ndarray]:
        limit = self.options.max_batch_size
        if rows > limit:
            raise ServingError(Code.INVALID_ARGUMENT, f"Task size {rows} is larger than maximum batch size {limit}")
        task = _Task(key, rows, inputs, run, time.monotonic())
        with self._cv:
            if self._closed:
                raise ServingError(Code.UNAVAILABLE, "The server is shutting down")
            if self._queued_rows + rows > self._capacity:
                raise ServingError(
                    Code.UNAVAILABLE, "The batch scheduling queue to which this task was submitted is full"
                )
            self._tasks.append(task)
            self._queued_rows += rows
            log.debug("Queued %d rows (%d rows waiting)", rows, self._queued_rows)
            self._cv.notify_all()
        return task.future.result()

    def _next_batch(self) -> list[_Task] | None:
        timeout = self.options.batch_timeout_micros / 1e6
        with self._cv:
            while True:
                if not self._tasks:
                    if self._closed:
                        return None
                    self._cv.wait()
                    continue
                first = self._tasks[0]
                candidates = [t for t in self._tasks if t.key == first.key]
                batch, rows = [], 0
                for task in candidates:
                    if rows + task.rows > self.options.max_batch_size:
                        break
                    batch.append(task)
                    rows += task.rows
                full = rows == self.options.max_batch_size or len(batch) < len(candidates)
                wait = first.enqueued + timeout - time.monotonic()
                if full or wait <= 0 or self._draining:
                    for task in batch:
                        self._tasks.remove(task)
                    self._queued_rows -= rows
                    return batch
                self._cv.wait(wait)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _run(self, batch: list[_Task]) -> None:
        total = sum(t.rows for t in batch)
        try:
            if len(batch) == 1:
                merged = batch[0].inputs
            else:
                merged = {alias: np.concatenate([t.inputs[alias] for t in batch]) for alias in batch[0].inputs}
            outputs = batch[0].run(merged)
            for alias, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != total:
                    raise ServingError(
                        Code.INTERNAL,
                        f"Batched output {alias} has shape {list(value.shape)} for a batch of {total} rows: "
                        "this signature cannot be batched (run without --enable_batching)",
                    )
            log.debug("Ran a batch of %d rows from %d requests", total, len(batch))
            start = 0
            for task in batch:
                task.future.set_result({alias: value[start : start + task.rows] for alias, value in outputs.items()})
                start += task.rows
        except Exception as e:
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(e)


# ---- requests: checks shared by gRPC and REST ---------------------------------------------------


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
                    f"{alias}: expected shape {_shape_text(spec.shape)} but got {list(value.shape)}",
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
            f"{alias}: expected {_dtype_name(spec.dtype.as_datatype_enum)} but got {_dtype_name(proto.dtype)}",
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


def _version_of(model_spec) -> int | None:
    return model_spec.version.value if model_spec.HasField("version") else None


# ---- gRPC ---------------------------------------------------------------------------------------


def _answer(context: grpc.ServicerContext, handler):
    """Run a handler; errors become the status TF Serving would give, never UNKNOWN with a traceback."""
    try:
        return handler()
    except ServingError as e:
        error = e
    except Exception as e:
        log.exception("Unexpected error in a gRPC call")
        error = ServingError(Code.INTERNAL, f"{type(e).__name__}: {e}")
    context.abort(error.code, error.message)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, models: ModelManager, predictor: Predictor):
        self.models = models
        self.predictor = predictor

    def Predict(self, request, context):
        return _answer(context, lambda: self._predict(request))

    def _predict(self, request):
        spec = request.model_spec
        signature_name = spec.signature_name or SIGNATURE_NAME
        with self.predictor.admit(), self.models.use(spec.name, _version_of(spec), spec.version_label) as served:
            signature = served.signatures.get(signature_name)
            if signature is None:
                raise ServingError(Code.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.')
            self.predictor.check_input_names(signature, request.inputs)
            aliases = self.predictor.output_aliases(signature, request.output_filter)
            inputs = {a: tensor_proto_to_array(a, p, signature.inputs[a]) for a, p in request.inputs.items()}
            outputs = self.predictor.run(served, signature, inputs, aliases)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = spec.name
            response.model_spec.version.value = served.version
            response.model_spec.signature_name = signature_name
        for alias, value in outputs.items():
            array_to_tensor_proto(value, response.outputs[alias])
        return response

    def GetModelMetadata(self, request, context):
        return _answer(context, lambda: model_metadata(self.models, request))


def model_metadata(models: ModelManager, request) -> get_model_metadata_pb2.GetModelMetadataResponse:
    if not request.metadata_field:
        raise ServingError(Code.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")
    for name in request.metadata_field:
        if name != SIGNATURE_DEF_FIELD:
            raise ServingError(Code.INVALID_ARGUMENT, f"Metadata field {name} is not supported")
    spec = request.model_spec
    with models.use(spec.name, _version_of(spec), spec.version_label) as served:
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = served.version
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in served.signature_defs.items():
            signatures.signature_def[name].CopyFrom(signature_def)
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signatures)
    return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, models: ModelManager):
        self.models = models

    def GetModelStatus(self, request, context):
        def status():
            if not request.HasField("model_spec"):
                raise ServingError(Code.INVALID_ARGUMENT, "Missing ModelSpec")
            return self.models.status(request.model_spec.name, _version_of(request.model_spec))

        return _answer(context, status)


# ---- REST ---------------------------------------------------------------------------------------

_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)", re.IGNORECASE
)
_STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?", re.I)


def _from_json(alias: str, value, spec: tf.TensorSpec) -> np.ndarray:
    if spec.dtype == tf.string:
        value = _decode_binary(value)
        return np.array(value, dtype=object)
    try:
        return np.asarray(value, dtype=spec.dtype.as_numpy_dtype)
    except (TypeError, ValueError) as e:
        raise ServingError(
            Code.INVALID_ARGUMENT, f"{alias}: cannot read the JSON value as {spec.dtype.name}: {e}"
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
            response = self.models.status(name, version)
            return json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
        if path.lower().startswith("/v1/"):
            raise ServingError(Code.INVALID_ARGUMENT, f"Malformed request: {request.method} {path}")
        raise ServingError(Code.NOT_FOUND, f"Not found: {request.method} {path} (the API is under /v1/models)")

    def _metadata(self, name: str, version: int | None, label: str) -> dict:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[SIGNATURE_DEF_FIELD])
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        request.model_spec.version_label = label
        response = model_metadata(self.models, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata[SIGNATURE_DEF_FIELD].Unpack(signatures)

        # Like TF Serving, the Any is shown as the SignatureDefMap it holds, with proto field names.
        def as_dict(message):
            return json_format.MessageToDict(
                message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )

        return {"model_spec": as_dict(response.model_spec), "metadata": {SIGNATURE_DEF_FIELD: as_dict(signatures)}}

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


# ---- the server ---------------------------------------------------------------------------------


class ModelServer:
    """The model, the gRPC and REST servers, and their orderly start and stop."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        base_path = Path(args.model_base_path)
        if not base_path.is_dir():
            raise StartupError(
                f"Model base path {base_path} is not a directory. It should hold numbered SavedModel versions "
                f"(<base>/1/saved_model.pb); for the course model run `make model` first, or pass --model_base_path."
            )
        self.health = health.HealthServicer()
        self.models = ModelManager(args.model_name, base_path, args.file_system_poll_wait_seconds, self._serving)
        self.batcher = None
        if args.enable_batching:
            options = BatchingOptions()
            if args.batching_parameters_file:
                try:
                    options = parse_batching_parameters(Path(args.batching_parameters_file).read_text())
                except (OSError, ValueError) as e:
                    raise StartupError(f"--batching_parameters_file {args.batching_parameters_file}: {e}") from e
            self.batcher = Batcher(options)
        self.predictor = Predictor(self.batcher, args.max_concurrent_requests)
        self.grpc_server = None
        self.rest_server = None
        self.rest_api = None

    def _serving(self) -> None:
        for service in ("", *SERVICE_NAMES):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> None:
        args = self.args
        self.models.poll()
        if self.models.current is None:
            self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            log.warning("No version of %s could be loaded yet: health is NOT_SERVING until one is", args.model_name)
        self.models.start_polling()
        if self.batcher is not None:
            self.batcher.start()
            log.info("Batching on: %s", self.batcher.options)

        limit = args.grpc_max_message_bytes
        # As many calls at once as there are threads: one more is refused at once (RESOURCE_EXHAUSTED) instead
        # of waiting unseen in the executor's queue until its deadline.
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=args.grpc_max_threads, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=args.grpc_max_threads,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Without this a second server on the same port starts silently and steals half the calls.
                ("grpc.so_reuseport", 0),
                *args.grpc_channel_arguments,
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(self.models, self.predictor), self.grpc_server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(self.models), self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        try:
            port = self.grpc_server.add_insecure_port(f"{args.host}:{args.port}")
        except RuntimeError as e:
            raise StartupError(f"Cannot listen for gRPC on {args.host}:{args.port} (in use?): choose --port") from e
        self.grpc_server.start()
        log.info("gRPC on %s:%d (messages up to %d MiB)", args.host, port, limit // MIB)

        if args.rest_api_port:
            self.rest_api = RestApi(self.models, self.predictor, args.rest_api_max_request_bytes)
            try:
                self.rest_server = make_server(args.host, args.rest_api_port, self.rest_api, threaded=True)
            except OSError as e:
                raise StartupError(
                    f"Cannot listen for REST on {args.host}:{args.rest_api_port} ({e.strerror}): "
                    "choose --rest_api_port, or 0 to turn REST off"
                ) from e
            threading.Thread(target=self.rest_server.serve_forever, name="rest", daemon=True).start()
            log.info("REST on %s:%d", args.host, self.rest_server.server_port)

    def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish within `grace` seconds, then release everything."""
        deadline = time.monotonic() + grace
        self.health.enter_graceful_shutdown()
        if self.batcher is not None:
            self.batcher.drain()
        stopped = self.grpc_server.stop(grace) if self.grpc_server else None
        if self.rest_server is not None:
            self.rest_server.shutdown()
            self.rest_server.server_close()
            if not self.rest_api.wait_idle(max(0.0, deadline - time.monotonic())):
                log.warning("REST requests still running after %.0f s: dropping them", grace)
        if stopped is not None:
            stopped.wait()
        if self.batcher is not None:
            self.batcher.close()
        self.models.stop()


def _flag_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """TF Serving's --grpc_channel_arguments: `name=value,name=value`, whole numbers as ints."""
    arguments = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise argparse.ArgumentTypeError(f"expected name=value pairs separated by commas, not {item!r}")
        arguments.append((name, int(value) if re.fullmatch(r"-?\d+", value) else value))
    return arguments


def parse_args(argv=None) -> argparse.Namespace:
    # Flags spelled as tensorflow_model_server spells them; MODEL_NAME and MODEL_BASE_PATH as the
    # tensorflow/serving image reads them (the base path there is $MODEL_BASE_PATH/$MODEL_NAME).
    parser = argparse.ArgumentParser(description="Serve a SavedModel over TF Serving's gRPC and REST APIs.")
    parser.add_argument("--port", type=int, default=GRPC_PORT, help="gRPC port; 0 picks a free one (%(default)s)")
    parser.add_argument(
        "--rest_api_port", type=int, default=REST_PORT, help="REST port; 0 turns REST off (%(default)s)"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (%(default)s)")  # noqa: S104 - as TF Serving
    parser.add_argument(
        "--model_name",
        default=os.environ.get("MODEL_NAME", MODEL_NAME),
        help="the name clients ask for ($MODEL_NAME, else %(default)s)",
    )
    parser.add_argument(
        "--model_base_path",
        help=f"directory of numbered SavedModel versions ($MODEL_BASE_PATH/<model name>, else {MODEL_BASE_PATH} "
        "in this repository)",
    )
    parser.add_argument(
        "--enable_batching",
        type=_flag_bool,
        nargs="?",
        const=True,
        default=False,
        help="merge concurrent requests into one model call",
    )
    parser.add_argument(
        "--batching_parameters_file",
        help="TF Serving's BatchingParameters in protobuf text format (see dockerfiles/batching.config)",
    )
    parser.add_argument(
        "--file_system_poll_wait_seconds",
        type=float,
        default=1.0,
        help="seconds between looks for a new version; 0 looks once, at start-up (%(default)s)",
    )
    parser.add_argument(
        "--max_concurrent_requests",
        type=int,
        default=DEFAULT_MAX_REQUESTS,
        help="Predict requests held at once, running or waiting for the model; one more is answered UNAVAILABLE "
        "at once; 0: no limit (%(default)s)",
    )
    parser.add_argument(
        "--grpc_max_threads",
        type=int,
        help="gRPC calls served at once; more are refused with RESOURCE_EXHAUSTED "
        f"(default: --max_concurrent_requests + {SPARE_GRPC_THREADS}, for status, metadata and health calls)",
    )
    parser.add_argument(
        "--grpc_max_message_bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest gRPC message received or sent (%(default)s)",
    )
    parser.add_argument(
        "--grpc_channel_arguments",
        type=_channel_arguments,
        default=[],
        help="gRPC server arguments as TF Serving takes them, e.g. grpc.max_connection_age_ms=60000 (comma-separated)",
    )
    parser.add_argument(
        "--rest_api_max_request_bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest REST request body; larger ones get 413 (%(default)s)",
    )
    parser.add_argument(
        "--grace_period_seconds",
        type=float,
        default=10.0,
        help="on SIGTERM or SIGINT, how long in-flight requests may still take (%(default)s)",
    )
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.model_base_path is None:
        env_base = os.environ.get("MODEL_BASE_PATH")
        args.model_base_path = os.path.join(env_base, args.model_name) if env_base else str(ROOT / MODEL_BASE_PATH)
    if args.grpc_max_threads is None:
        args.grpc_max_threads = max(args.max_concurrent_requests, 16) + SPARE_GRPC_THREADS
    if args.batching_parameters_file and not args.enable_batching:
        parser.error("--batching_parameters_file needs --enable_batching")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # it logs every request at INFO

    # Handlers first, so a SIGTERM during the model load still ends in an orderly stop.
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            # Ctrl-C twice means "now"; a repeated SIGTERM changes nothing.
            if signum == signal.SIGINT:
                log.warning("Second SIGINT: exiting without waiting for requests")
                os._exit(1)
            return
        grace = args.grace_period_seconds
        log.info("%s: stopping (in-flight requests get up to %.0f s)", signal.Signals(signum).name, grace)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = None
    try:
        server = ModelServer(args)
        server.start()
    except StartupError as e:
        log.error("%s", e)
        if server is not None:
            server.stop(0)
        return 1
    # A timed wait keeps the main thread responsive to signals.
    while not stop.wait(1.0):
        pass
    server.stop(args.grace_period_seconds)
    log.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
