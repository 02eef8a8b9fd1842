"""The model-server image on LiteRT (dockerfiles/image-model-server-litert.dockerfile, the `litert_image` fixture), run
locked down as the manifests run it, and answering as TensorFlow does. Its arm64 build runs on the cluster in
tests/test_arm64.py. Where no engine answers these skip and say why; CI's switches make them failures.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_arm64 import course_predict
from test_images import image_user, locked_down

import contract
import engine
import gateway
import photos
from engine import inspect, note, remove, run, unique

pytestmark = pytest.mark.docker

# How far the served logits may be from the Keras model's, as test_images.py holds the TensorFlow image.
TOLERANCE = 1e-4


def images() -> np.ndarray:
    """Three photos as the gateway sends them (float32, scaled)."""
    return np.stack([gateway.preprocess(photos.jpeg(seed), gateway.Settings()) for seed in range(3)])


def pixels_predict(target: str, batch: np.ndarray) -> np.ndarray:
    """The gateway's uint8 wire: the same photos' pixels to serving_uint8."""
    import grpc

    import protobuf

    request = protobuf.PredictRequest()
    request.model_spec.name = contract.MODEL_NAME
    request.model_spec.signature_name = contract.UINT8_SIGNATURE_NAME
    request.inputs[contract.INPUT_NAME].CopyFrom(protobuf.np_to_protobuf(batch))
    with grpc.insecure_channel(target) as channel:
        method = channel.unary_unary(
            protobuf.PREDICT_METHOD,
            request_serializer=protobuf.PredictRequest.SerializeToString,
            response_deserializer=protobuf.PredictResponse.FromString,
        )
        response = method(request, timeout=120.0)
    return protobuf.protobuf_to_np(response.outputs[contract.OUTPUT_NAME])


def serve(image: str, name: str, *flags: str, platform: str = "", timeout: float = 120) -> tuple[str, float]:
    """The image started locked down as the model's manifest runs it; its gRPC address once healthy, and how long
    that took from `docker run`."""
    started = time.monotonic()
    platform_flags = ["--platform", platform] if platform else []
    command = ["docker", "run", "-d", *platform_flags, *locked_down(name, "clothing-model"), image, *flags]
    run(command, timeout=60)
    engine.wait_healthy(name, timeout=timeout)
    return f"{engine.address(name)}:{contract.GRPC_PORT}", time.monotonic() - started


def test_the_litert_image_serves_tf_servings_contract_without_tensorflow(litert_image, standin_keras):
    name = unique("zoomcamp-10-model-server-litert")
    try:
        target, seconds = serve(litert_image, name, "--enable_batching")
        assert image_user(litert_image) == "65534:65534" == inspect(name)["Config"]["User"]
        logs = run(["docker", "logs", name]).stderr
        assert f"from /models/{contract.MODEL_NAME}/1 with LiteRT" in logs and "Batching on" in logs
        missing = run(["docker", "exec", name, "python", "-c", "import tensorflow"], check=False)
        assert missing.returncode != 0 and "No module named 'tensorflow'" in missing.stderr
        batch = images()
        expected = standin_keras(batch, training=False).numpy()
        assert np.abs(course_predict(target, batch) - expected).max() <= TOLERANCE
        pixels = np.stack([gateway.pixels(photos.jpeg(seed), gateway.Settings()) for seed in range(3)])
        assert np.abs(pixels_predict(target, pixels) - expected).max() <= TOLERANCE
        note(f"LiteRT model-server image healthy {seconds:.1f} s after docker run (HEALTHCHECK every 5 s)")
        run(["docker", "stop", name], timeout=30)
        assert inspect(name)["State"]["ExitCode"] == 0
        assert "SIGTERM: stopping" in run(["docker", "logs", name]).stderr
    finally:
        remove(name)
