"""The model: numbered SavedModel versions on disk, loaded, swapped when a new one appears, and held by the
requests that use them (TF Serving's servable manager, for one model)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

from serving.errors import GRPC_CODE_BY_NUMBER, Code, ServingError

log = logging.getLogger("model_server")

SIGNATURE_DEF_FIELD = "signature_def"  # the one GetModelMetadata field TF Serving knows
State = get_model_status_pb2.ModelVersionStatus.State


def shape_text(shape) -> str:
    if shape.rank is None:
        return "[?]"
    return "[" + ",".join("-1" if d is None else str(d) for d in shape.as_list()) + "]"


def dtype_name(enum: int) -> str:
    try:
        return types_pb2.DataType.Name(enum)
    except ValueError:
        return f"dtype {enum}"


@dataclass(frozen=True)
class Signature:
    name: str
    function: object  # the loaded ConcreteFunction
    inputs: dict[str, tf.TensorSpec]
    outputs: dict[str, tf.TensorSpec]
    direct: object = None  # one tensor -> one tensor, the graph under `function` (see _direct_call); None: not used

    def describe(self) -> str:
        def specs(tensors):
            return ", ".join(f"{k} {s.dtype.name}{shape_text(s.shape)}" for k, s in tensors.items())

        return f"signature {self.name}: {specs(self.inputs)} -> {specs(self.outputs)}"


def _read_meta_graph(version_dir: Path) -> meta_graph_pb2.MetaGraphDef:
    """The serving MetaGraphDef, whose signature_def map is what GetModelMetadata returns."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    graphs = list(saved_model.meta_graphs)
    if not graphs:
        raise ValueError(f"{version_dir / 'saved_model.pb'} holds no MetaGraphDef")
    return next((g for g in graphs if "serve" in g.meta_info_def.tags), graphs[0])


def _direct_call(function):
    """The graph under a one-input, one-output signature as a call of one tensor, or None where TensorFlow does not
    expose it.

    A loaded signature's public call binds its keyword arguments to the structured signature and looks up every
    captured variable again on each call: Python work that does not depend on the request (bench/bench_model_server.py
    measures what it costs). Underneath is one
    graph function that takes the input tensor and the captured handles, which do not change while the version is
    loaded. That is private TensorFlow API, so ServedVersion.warm_up uses it only after it has given the same
    answer as the public call; a signature with several inputs or outputs always takes the public call, where the
    order of flat tensors would be a guess."""
    graph = getattr(function, "_inference_function", None)
    if graph is None or not hasattr(graph, "call_flat"):
        return None
    captured = list(function.captured_inputs)

    def call(tensor):
        (output,) = graph.call_flat(tensor, *captured)
        return output

    return call


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
            if signature.direct is not None:
                ((value,), (alias,)) = inputs.values(), signature.outputs
                return {alias: signature.direct(tf.convert_to_tensor(value)).numpy()}
            outputs = signature.function(**{alias: tf.convert_to_tensor(v) for alias, v in inputs.items()})
        except tf.errors.OpError as e:
            raise ServingError(GRPC_CODE_BY_NUMBER.get(e.error_code, Code.INTERNAL), e.message) from e
        return {alias: tensor.numpy() for alias, tensor in outputs.items()}

    def warm_up(self) -> None:
        """One call of each signature before taking traffic, so that no first client pays for tracing and
        allocation, whichever signature it asks for (the gateway sends uint8 pixels to a second one). A
        one-input, one-output signature then switches to the direct call of its graph if that gives the same
        answer (_direct_call)."""
        for name, signature in list(self.signatures.items()):
            inputs = {}
            for alias, spec in signature.inputs.items():
                shape = [] if spec.shape.rank is None else [1 if d is None else d for d in spec.shape.as_list()]
                inputs[alias] = np.full(shape, b"" if spec.dtype == tf.string else 0, spec.dtype.as_numpy_dtype)
            expected = self.run(signature, inputs)
            if len(signature.inputs) == 1 and len(signature.outputs) == 1:
                self.signatures[name] = self._with_direct_call(signature, inputs, expected)

    def _with_direct_call(self, signature: Signature, inputs: dict, expected: dict) -> Signature:
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
            log.debug("Version %d failed to load and its files have not changed: not tried again", target)
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


def version_of(model_spec) -> int | None:
    return model_spec.version.value if model_spec.HasField("version") else None


def model_metadata(models: ModelManager, request) -> get_model_metadata_pb2.GetModelMetadataResponse:
    if not request.metadata_field:
        raise ServingError(Code.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")
    for name in request.metadata_field:
        if name != SIGNATURE_DEF_FIELD:
            raise ServingError(Code.INVALID_ARGUMENT, f"Metadata field {name} is not supported")
    spec = request.model_spec
    with models.use(spec.name, version_of(spec), spec.version_label) as served:
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = served.version
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in served.signature_defs.items():
            signatures.signature_def[name].CopyFrom(signature_def)
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signatures)
    return response
