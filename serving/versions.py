"""The model: numbered versions on disk, loaded by the runtime, swapped when a new one appears, and held by the
requests that use them (TF Serving's servable manager, for one model). No TensorFlow here: the runtime
(serving/runtime_tensorflow.py or serving/runtime_litert.py) loads and runs a version."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

import protobuf
from serving.errors import Code, ServingError
from serving.tensors import Signature

log = logging.getLogger("model_server")

SIGNATURE_DEF_FIELD = "signature_def"  # the one GetModelMetadata field TF Serving knows


def zero_inputs(signature: Signature) -> dict[str, np.ndarray]:
    """A request of one row of zeros (empty strings) for the signature: what a warm-up call sends."""
    inputs = {}
    for alias, spec in signature.inputs.items():
        shape = [] if spec.shape is None else [1 if d is None else d for d in spec.shape]
        inputs[alias] = np.full(shape, b"" if spec.dtype == protobuf.DT_STRING else 0, spec.numpy_dtype)
    return inputs


class ServedVersion:
    """One loaded version. Requests hold it while they use it, so it is unloaded only once idle. A runtime fills in
    `signatures` and `signature_defs` (what GetModelMetadata shows) and runs them."""

    def __init__(self, version: int, path: Path):
        self.version = version
        self.path = path
        self.signatures: dict[str, Signature] = {}
        self.signature_defs: dict[str, protobuf.SignatureDef] = {}
        self._in_flight = 0
        self._idle = threading.Condition()

    def run(self, signature: Signature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The signature's outputs for these inputs (already checked against it); ServingError for the client."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """One call of each signature before taking traffic, so that no first client pays for it (the gateway sends
        uint8 pixels to a second signature)."""
        for signature in list(self.signatures.values()):
            self.run(signature, zero_inputs(signature))

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


class Runtime(Protocol):
    """What runs the model: TensorFlow (a SavedModel) or LiteRT (a .tflite file), each in a module of its own."""

    name: str
    model_file: str  # the file a version folder holds, e.g. saved_model.pb: loaded only once it is there

    def load(self, version: int, path: Path) -> ServedVersion: ...


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

    def __init__(self, name: str, base_path: Path, runtime: Runtime, poll_seconds: float, on_available=None):
        self.name = name
        self.runtime = runtime
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
        if not (path / self.runtime.model_file).is_file():
            log.debug("Version %d has no %s yet: still being written?", target, self.runtime.model_file)
            return
        # Taken before loading: files that change during a failed load still count as a change.
        files = _files_of(path)
        last_files, last_error = self._failures.get(target, ((), ""))
        if files == last_files:
            log.debug("Version %d failed to load and its files have not changed: not tried again", target)
            return
        with self._lock:
            self._states[target] = (protobuf.LOADING, "")
        started = time.monotonic()
        try:
            new = self.runtime.load(target, path)
        except Exception as e:  # half-written or broken: keep serving the old one, retry once files change
            error = f"{type(e).__name__}: {e}"
            with self._lock:
                self._states[target] = (protobuf.END, error)
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
            self._states[target] = (protobuf.AVAILABLE, "")
            if old is not None:
                self._states[old.version] = (protobuf.UNLOADING, "")
        log.info(
            "Serving %s version %d from %s with %s (%s) - loaded in %.1f s",
            self.name,
            target,
            path,
            self.runtime.name,
            "; ".join(s.describe() for s in new.signatures.values()) or "no signatures",
            time.monotonic() - started,
        )
        self._on_available()
        if old is not None:
            old.wait_idle()
            with self._lock:
                self._states[old.version] = (protobuf.END, "")
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

    def status(self, name: str, version: int | None) -> protobuf.GetModelStatusResponse:
        with self._lock:
            states = dict(self._states) if name == self.name else {}
        if version is not None:
            if version not in states:
                raise ServingError(Code.NOT_FOUND, f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        if not states:
            raise ServingError(Code.NOT_FOUND, f"Could not find any versions of model {name}")
        response = protobuf.GetModelStatusResponse()
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


def model_metadata(models: ModelManager, request) -> protobuf.GetModelMetadataResponse:
    if not request.metadata_field:
        raise ServingError(Code.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")
    for name in request.metadata_field:
        if name != SIGNATURE_DEF_FIELD:
            raise ServingError(Code.INVALID_ARGUMENT, f"Metadata field {name} is not supported")
    spec = request.model_spec
    with models.use(spec.name, version_of(spec), spec.version_label) as served:
        response = protobuf.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = served.version
        signatures = protobuf.SignatureDefMap()
        for name, signature_def in served.signature_defs.items():
            signatures.signature_def[name].CopyFrom(signature_def)
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signatures)
    return response
