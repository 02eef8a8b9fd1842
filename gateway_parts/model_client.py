"""The model tier behind one gRPC channel, as TF Serving's example client talks to it, made to last.

- one channel per process, reused by every request (a channel is a pool of HTTP/2 connections), following the
  addresses a name has as they change (discovery.py);
- `round_robin` over every address the target resolves to: `dns:///clothing-model-headless:8500` in Kubernetes
  (one address per model pod), or `ipv4:10.0.0.1:8500,10.0.0.2:8500`;
- a deadline on every call, and a second try within it where one can mend the failure (a connection lost, a
  model server that stopped with the call in hand);
- the signature and tensor names asked of the model server (GetModelMetadata), and asked again when a call says
  the model changed under the gateway (a new version with other names).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np

import protobuf
from contract import CLASSES, SIGNATURE_NAME
from gateway_parts.discovery import FollowedChannel
from gateway_parts.errors import GatewayError, model_error
from gateway_parts.metrics import MODEL_RETRIES
from gateway_parts.settings import Settings
from gateway_parts.signatures import Route, choose, routes_from_settings, routes_from_signatures

log = logging.getLogger("gateway")

CHANNEL_OPTIONS = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # A restarted model server is found again within a second, not after gRPC's default back-off of minutes.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 5000),
]
# After UNAVAILABLE, how long one more try may wait for a connection (within the request's deadline).
RECONNECT_WAIT = 2.0
# A call failing with these is tried once more (ModelClient._call).
_TRY_AGAIN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
# A call failing with these says the model is not what the gateway thinks: ask its metadata again.
_MODEL_CHANGED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


class Stubs:
    """TF Serving's three calls that the gateway makes, on one channel."""

    def __init__(self, channel: grpc.Channel):
        def method(path, request_type, response_type):
            return channel.unary_unary(
                path, request_serializer=request_type.SerializeToString, response_deserializer=response_type.FromString
            )

        self.channel = channel
        self.predict = method(protobuf.PREDICT_METHOD, protobuf.PredictRequest, protobuf.PredictResponse)
        self.metadata = method(
            protobuf.METADATA_METHOD, protobuf.GetModelMetadataRequest, protobuf.GetModelMetadataResponse
        )
        self.status = method(protobuf.STATUS_METHOD, protobuf.GetModelStatusRequest, protobuf.GetModelStatusResponse)


@dataclass
class Prediction:
    logits: np.ndarray  # images x classes
    model_version: int
    signature: str = SIGNATURE_NAME
    wire: str = "float32"


class ModelClient:
    """The model tier behind one reused gRPC channel."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.target = settings.tf_serving_host
        # Calls in flight on a channel that was replaced finish before it is closed: their deadline, and a second.
        self.channels = FollowedChannel(
            self.target,
            CHANNEL_OPTIONS,
            Stubs,
            self._answers,
            settings.lookup_every,
            retire_after=settings.predict_timeout + 1,
        )
        self._routes: dict | None = None
        self._routes_lock = threading.Lock()
        self._unavailable_at = float("-inf")  # when a reconnect wait last ended without a connection

    @property
    def _stubs(self) -> Stubs:
        return self.channels.current

    def close(self) -> None:
        self.channels.close()

    def _answers(self, stubs: Stubs, seconds: float) -> bool:
        """Whether a model server behind these stubs answers within `seconds`, whatever it says of the model."""
        try:
            stubs.status(self._spec(protobuf.GetModelStatusRequest()), timeout=seconds, wait_for_ready=True)
        except grpc.RpcError as error:
            return error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return True

    def _call(self, method: str, message, timeout: float):
        """One RPC (`method`: predict or metadata) with a deadline, tried once more, within that deadline,
        on the channel of the moment (round robin then picks a server that is up), when the first try failed in a
        way another try can mend. Both calls read the model and change nothing, so a second try is harmless:

        - UNAVAILABLE: no connection (a model server that just started or restarted). The second try waits up to
          RECONNECT_WAIT for one. If it fails too, the tier is down: the first error stands (503), and for the next
          RECONNECT_WAIT seconds calls fail at once instead of waiting again.
        - CANCELLED: a model server stopped with the call in hand (a rollout); the gateway never cancels its own."""
        started = time.monotonic()
        try:
            return getattr(self._stubs, method)(message, timeout=timeout)
        except grpc.RpcError as error:
            code = error.code()
            left = started + timeout - time.monotonic()
            if code not in _TRY_AGAIN or left <= 0 or time.monotonic() - self._unavailable_at < RECONNECT_WAIT:
                raise
            reconnecting = code == grpc.StatusCode.UNAVAILABLE
            MODEL_RETRIES.labels(code.name).inc()
            try:
                return getattr(self._stubs, method)(
                    message, timeout=min(left, RECONNECT_WAIT) if reconnecting else left, wait_for_ready=reconnecting
                )
            except grpc.RpcError as retry_error:
                gone = retry_error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if reconnecting and gone:
                    self._unavailable_at = time.monotonic()
                    raise error from None
                if retry_error.code() == grpc.StatusCode.UNAVAILABLE:
                    self._unavailable_at = time.monotonic()
                raise

    def _spec(self, message, signature: str = ""):
        message.model_spec.name = self.settings.model_name
        message.model_spec.signature_name = signature or self.settings.signature_name
        return message

    # ---- where a batch goes ----

    def route(self, dtype=np.uint8) -> Route:
        """Where a batch of `dtype` goes (see signatures.choose), or a 502 that says why it cannot go anywhere."""
        chosen = choose(self._known_routes(), dtype, self.settings.wire)
        if isinstance(chosen, str):
            raise GatewayError(502, "model_error", chosen)
        return chosen

    def tensor_names(self) -> tuple[str, str]:
        """(input, output) names of the signature that pixels are sent to."""
        route = self.route(np.uint8)
        return route.input_name, route.output_name

    def _known_routes(self) -> dict:
        """From the settings when they name both tensors, else from the model's metadata, asked once (and again
        after _forget)."""
        from_settings = routes_from_settings(self.settings)
        if from_settings is not None:
            return from_settings
        with self._routes_lock:
            if self._routes is None:
                self._routes = self._discover()
            return self._routes

    def _forget(self, route: Route) -> None:
        """After a call that says the model changed: ask again, unless another request already has."""
        with self._routes_lock:
            if self._routes is not None and route in self._routes.values():
                self._routes = None

    def _discover(self) -> dict:
        request = self._spec(protobuf.GetModelMetadataRequest())
        request.metadata_field.append("signature_def")
        try:
            response = self._call("metadata", request, self.settings.predict_timeout)
        except grpc.RpcError as error:
            raise model_error(error, self.target) from None
        signatures = protobuf.SignatureDefMap.FromString(response.metadata["signature_def"].value).signature_def
        routes = routes_from_signatures(signatures, self.settings)
        chosen = choose(routes, np.uint8, self.settings.wire)
        shown = chosen if isinstance(chosen, str) else chosen.describe()
        log.info("model %s: images go %s", self.settings.model_name, shown)
        return routes

    # ---- the calls ----

    def predict(self, batch: np.ndarray) -> Prediction:
        """Classify a batch of images x 299 x 299 x 3: uint8 pixels, sent as the model's signature takes them, or
        float32 already scaled. If the model changed under the gateway (a new version without that signature, or
        other names), its metadata is asked again and the call made once more, within the same deadline."""
        started = time.monotonic()
        route = self.route(batch.dtype)
        try:
            response = self._predict_on(route, batch, self.settings.predict_timeout)
        except grpc.RpcError as error:
            left = self.settings.predict_timeout - (time.monotonic() - started)
            route, response = self._retry_if_changed(error, route, batch, left)
        return self._prediction(response, route, len(batch))

    def _retry_if_changed(self, error: grpc.RpcError, route: Route, batch: np.ndarray, left: float):
        """After a failed Predict: the (route, response) of one more try if the model changed and time is left,
        else the failure as the gateway's answer."""
        if not (error.code() in _MODEL_CHANGED and route.discovered and left > 0):
            raise model_error(error, self.target) from None
        self._forget(route)
        log.warning("model %s answered %s: asking its metadata again", self.settings.model_name, error.code().name)
        retried = self.route(batch.dtype)
        if retried == route:
            raise model_error(error, self.target) from None
        try:
            return retried, self._predict_on(retried, batch, left)
        except grpc.RpcError as retry_error:
            raise model_error(retry_error, self.target) from None

    def _prediction(self, response, route: Route, images: int) -> Prediction:
        """The answer's logits, checked: one row of one score per class for every image sent."""
        if route.output_name not in response.outputs:
            raise GatewayError(502, "model_error", f"the model's answer has no output {route.output_name!r}")
        logits = protobuf.protobuf_to_np(response.outputs[route.output_name])
        if logits.shape != (images, len(CLASSES)):
            raise GatewayError(
                502,
                "model_error",
                f"the model answered shape {list(logits.shape)} for {images} images; expected "
                f"[{images}, {len(CLASSES)}] (one score per class: {', '.join(CLASSES)})",
            )
        version = response.model_spec.version.value
        return Prediction(logits.astype(np.float32), version, signature=route.signature, wire=route.wire)

    def predict_request(self, route: Route, batch: np.ndarray):
        """The PredictRequest that carries `batch` along `route`: what goes on the wire."""
        request = self._spec(protobuf.PredictRequest(), route.signature)
        request.inputs[route.input_name].CopyFrom(route.tensor(batch))
        request.output_filter.append(route.output_name)
        return request

    def _predict_on(self, route: Route, batch: np.ndarray, timeout: float):
        return self._call("predict", self.predict_request(route, batch), timeout)

    def ready(self, timeout: float = 2.0) -> tuple[bool, str]:
        """Whether the model server has a version of the model AVAILABLE, and a word on why not."""
        try:
            response = self._stubs.status(self._spec(protobuf.GetModelStatusRequest()), timeout=timeout)
        except grpc.RpcError as error:
            return False, f"{self.target}: {error.code().name} {error.details() or ''}".strip()
        states = {
            s.version: protobuf.MODEL_STATE_NAMES.get(s.state, str(s.state)) for s in response.model_version_status
        }
        available = [v for v, state in states.items() if state == "AVAILABLE"]
        if available:
            return True, f"version {max(available)} AVAILABLE"
        return False, f"no version AVAILABLE: {states or 'none loaded'}"
