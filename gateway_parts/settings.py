"""Everything the gateway can be told, read once from the environment, with an error that names the variable."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from contract import DEFAULT_TF_SERVING_HOST, MODEL_NAME, SIGNATURE_NAME, TF_SERVING_HOST_ENV
from safe_fetch import FetchPolicy

# GATEWAY_WIRE: "auto" sends uint8 pixels to the model's pixel signature when it has one, else float32 to
# MODEL_SIGNATURE; "float32" always sends the course's tensor; "uint8" requires the pixel signature.
WIRES = ("auto", "float32", "uint8")

_OFF = ("0", "false", "no", "off")


def env_number(environ, name: str, default, kind=float, minimum=0):
    """The number in environ[name], or `default` when unset or empty; a clear error when it is not one."""
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a {kind.__name__}; unset it or give a number") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything the gateway can be told; `Settings.from_env()` reads it from the environment."""

    tf_serving_host: str = DEFAULT_TF_SERVING_HOST
    model_name: str = MODEL_NAME
    signature_name: str = SIGNATURE_NAME
    input_name: str = ""  # empty: discovered from the model server's metadata
    output_name: str = ""
    wire: str = "auto"  # what goes to the model: uint8 pixels when it has the pixel signature (auto), or float32
    predict_timeout: float = 10.0  # seconds; the deadline of every Predict call
    lookup_every: float = 2.0  # seconds between lookups of the model tier's name (discovery.py); 0: gRPC's own
    max_images: int = 16  # per request, sent to the model as one batch
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 50_000_000  # decoded size limit (a 50-megapixel photo); bigger is refused
    jpeg_draft: bool = True  # decode large JPEGs at a reduced scale, never below twice the model's input size
    max_inflight: int = 4  # requests doing work at once in one process (its threads); the others wait
    queue_budget: float = 1.0  # seconds from arrival a request may wait for a slot; past that it is shed (503)
    # While this file exists, every answer closes its connection (k8s/base/gateway.yaml: its preStop hook creates
    # it in the pod's own /tmp); empty: never.
    drain_file: str = ""
    fetch: FetchPolicy = field(default_factory=FetchPolicy)

    @classmethod
    def from_env(cls, environ=os.environ) -> Settings:
        wire = (environ.get("GATEWAY_WIRE") or cls.wire).lower()
        if wire not in WIRES:
            raise ValueError(f"GATEWAY_WIRE={environ['GATEWAY_WIRE']!r}: choose one of {', '.join(WIRES)}")
        return cls(
            tf_serving_host=environ.get(TF_SERVING_HOST_ENV) or DEFAULT_TF_SERVING_HOST,
            model_name=environ.get("MODEL_NAME") or MODEL_NAME,
            signature_name=environ.get("MODEL_SIGNATURE") or SIGNATURE_NAME,
            input_name=environ.get("MODEL_INPUT", ""),
            output_name=environ.get("MODEL_OUTPUT", ""),
            wire=wire,
            predict_timeout=env_number(environ, "PREDICT_TIMEOUT_SECONDS", cls.predict_timeout, minimum=0.01),
            lookup_every=env_number(environ, "TF_SERVING_LOOKUP_SECONDS", cls.lookup_every),
            max_images=env_number(environ, "GATEWAY_MAX_IMAGES", cls.max_images, int, minimum=1),
            max_request_bytes=env_number(environ, "GATEWAY_MAX_REQUEST_BYTES", cls.max_request_bytes, int, 1),
            max_image_pixels=env_number(environ, "GATEWAY_MAX_IMAGE_PIXELS", cls.max_image_pixels, int, 1),
            jpeg_draft=environ.get("GATEWAY_JPEG_DRAFT", "1").lower() not in _OFF,
            max_inflight=env_number(environ, "GATEWAY_MAX_INFLIGHT", cls.max_inflight, int, minimum=1),
            queue_budget=env_number(environ, "GATEWAY_QUEUE_BUDGET", cls.queue_budget),
            drain_file=environ.get("GATEWAY_DRAIN_FILE", cls.drain_file),
            fetch=FetchPolicy.from_env(environ),
        )
