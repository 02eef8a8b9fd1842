"""The model-server image on LiteRT (dockerfiles/image-model-server-litert.dockerfile), built by the Makefile's own
target for amd64 and for arm64 (under qemu), run locked down as the manifests run it, and answering as TensorFlow does.

Its own tags (zoomcamp-10-model-server-litert:test, :test-arm64), built once per session with the converted stand-in
baked in. Where no engine answers, or no arm64 emulation, these skip and say why; CI's switches make them failures.
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
from engine import architecture, image_size_mb, inspect, note, one_time_build, remove, repository_context, run, unique

pytestmark = pytest.mark.docker

LITERT_IMAGE = "zoomcamp-10-model-server-litert:test"
LITERT_ARM64_IMAGE = "zoomcamp-10-model-server-litert:test-arm64"
# How far the served logits may be from the Keras model's, as test_images.py holds the TensorFlow image.
TOLERANCE = 1e-4


def make_build(context, base: str, image: str, platform: str = "") -> float:
    """`make build-model MODEL_SERVER=litert` in `context`, as a user runs it; the seconds it took."""
    started = time.monotonic()
    variables = ["MODEL_SERVER=litert", f"PYTHON_IMAGE={base}", f"MODEL_SERVER_LITERT_IMAGE={image}"]
    if platform:  # the build reaches the package index from the host's network, as test_arm64's builds do
        variables += [f"PLATFORM={platform}", "DOCKER_BUILD_FLAGS=--network host"]
    kind = "arm64 image" if platform else "image"
    with one_time_build(
        f"the LiteRT model-server image {image} (make build-model MODEL_SERVER=litert)", kind
    ) as budget:
        run(["make", "-C", str(context), "--no-print-directory", "build-model", *variables], timeout=budget)
    return time.monotonic() - started


@pytest.fixture(scope="session")
def litert_context(docker_engine, model_base, tmp_path_factory):
    return repository_context(model_base, tmp_path_factory.mktemp("litert-context"))


@pytest.fixture(scope="session")
def litert_image(litert_context) -> str:
    seconds = make_build(litert_context, engine.python_base(), LITERT_IMAGE)
    note(f"LiteRT model-server image: {image_size_mb(LITERT_IMAGE):.0f} MB with the stand-in, built in {seconds:.0f} s")
    return LITERT_IMAGE


@pytest.fixture(scope="session")
def litert_arm64_image(litert_context) -> str:
    base = engine.arm64_python_base()
    seconds = make_build(litert_context, base, LITERT_ARM64_IMAGE, "linux/arm64")
    note(
        f"LiteRT model-server image for arm64 (under qemu): {image_size_mb(LITERT_ARM64_IMAGE):.0f} MB with the "
        f"stand-in, built in {seconds:.0f} s"
    )
    return LITERT_ARM64_IMAGE


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


def test_the_litert_image_builds_for_arm64_with_litert_and_without_tensorflow(litert_arm64_image):
    assert architecture(litert_arm64_image) == "arm64"
    check = (
        "import platform, importlib.util as u; import serving.runtime_litert; "
        "print(platform.machine(), u.find_spec('tensorflow') is None)"
    )
    command = ["docker", "run", "--rm", "--platform", "linux/arm64", "--workdir", "/app", "--entrypoint", "python"]
    shown = run([*command, litert_arm64_image, "-c", check], timeout=300).stdout.split()
    assert shown == ["aarch64", "True"], shown


# Measured here: ai-edge-litert 2.3.0's aarch64 wheel, as PyPI ships it (nothing left out), dies with SIGSEGV in
# Interpreter() under Debian 12's qemu-user, with or without XNNPACK; it imports, and the same build serves on amd64.
# Strict: the day it runs under emulation, this fails and the mark goes.
@pytest.mark.xfail(
    strict=True, reason="LiteRT's aarch64 interpreter segfaults under qemu-user here (not on arm64 hardware, untested)"
)
def test_the_litert_image_for_arm64_answers_as_tensorflow_on_amd64(litert_arm64_image, standin_keras):
    name = unique("zoomcamp-10-model-server-litert-arm64")
    try:
        target, seconds = serve(litert_arm64_image, name, platform="linux/arm64", timeout=120)
        machine = run(["docker", "exec", name, "uname", "-m"]).stdout.strip()
        assert machine == "aarch64"
        batch = images()
        difference = float(np.abs(course_predict(target, batch) - standin_keras(batch, training=False).numpy()).max())
        note(
            f"LiteRT arm64 image under qemu: healthy {seconds:.1f} s after docker run, dense_7 within {difference:.1e}"
        )
        assert difference <= TOLERANCE
    finally:
        remove(name)
