"""arm64 as an Apple Silicon or Graviton user runs it: both images built for linux/arm64 by the Makefile's own
targets, run under emulation (qemu-aarch64) the way the kubelet runs k8s/overlays/arm64, and compared with amd64.

On this x86-64 machine everything arm64 runs under qemu, several times slower than natively (TensorFlow alone takes
tens of seconds to import), so the images are built once per session and the timeouts are generous. How fast
arm64 hardware serves stays unmeasured here. Without emulation these tests skip and say why; CI provides it and
sets ZOOMCAMP_REQUIRE_ARM64=1, and then they fail instead.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from test_pods import check_containers_run_as_declared, predict, start_pods, stop_pods

import protobuf
import real_answers
from contract import CLASSES, INPUT_NAME, MODEL_NAME, OUTPUT_NAME, SIGNATURE_NAME
from engine import (
    PHOTO,
    architecture,
    arm64_python_base,
    course_batch,
    image_size_mb,
    note,
    one_time_build,
    repository_context,
    run,
)
from servers import running_model_server

pytestmark = pytest.mark.docker

MODEL_SERVER_ARM64_IMAGE = "zoomcamp-10-model-server:test-arm64"
GATEWAY_ARM64_IMAGE = "zoomcamp-10-gateway:test-arm64"
# The same model-server image with the model trained here (notebook 00) in place of the stand-in.
MODEL_SERVER_ARM64_TRAINED_IMAGE = "zoomcamp-10-model-server:test-arm64-trained"


def make_build(target: str, context, base: str, model_image: str = MODEL_SERVER_ARM64_IMAGE) -> float:
    """`make <target>` for arm64 in `context`, as a user on an x86-64 machine would run it; the seconds it took."""
    started = time.monotonic()
    image = model_image if target == "build-model" else GATEWAY_ARM64_IMAGE
    variables = [
        "MODEL_SERVER=local",
        "PLATFORM=linux/arm64",
        f"PYTHON_IMAGE={base}",
        f"MODEL_SERVER_IMAGE={model_image}",
        f"GATEWAY_IMAGE={GATEWAY_ARM64_IMAGE}",
        "DOCKER_BUILD_FLAGS=--network host",  # the builds reach the package index from the host's network
    ]
    with one_time_build(
        f"the arm64 image {image} (make {target} PLATFORM=linux/arm64, under qemu)", "arm64 image"
    ) as budget:
        run(["make", "-C", str(context), "--no-print-directory", target, *variables], timeout=budget)
    return time.monotonic() - started


@pytest.fixture(scope="session")
def arm64_base() -> str:
    """First in a fixture's arguments: no emulation, no work on the others (the stand-in model's conversion)."""
    return arm64_python_base()


@pytest.fixture(scope="session")
def arm64_images(arm64_base, model_base, tmp_path_factory) -> SimpleNamespace:
    base = arm64_base
    context = repository_context(model_base, tmp_path_factory.mktemp("arm64-context"))
    model_seconds = make_build("build-model", context, base)
    gateway_seconds = make_build("build-gateway", context, base)
    note(
        f"arm64 images (make build-model build-gateway PLATFORM=linux/arm64, under qemu): the model server "
        f"{image_size_mb(MODEL_SERVER_ARM64_IMAGE):.0f} MB in {model_seconds:.0f} s, the gateway "
        f"{image_size_mb(GATEWAY_ARM64_IMAGE):.0f} MB in {gateway_seconds:.0f} s"
    )
    return SimpleNamespace(model=MODEL_SERVER_ARM64_IMAGE, gateway=GATEWAY_ARM64_IMAGE)


@pytest.fixture(scope="module")
def arm64_pods(arm64_images):
    started = start_pods("arm64", arm64_images.model, arm64_images.gateway, label=" on the arm64 images, under qemu")
    yield started
    stop_pods(started)


def course_predict(target: str, batch: np.ndarray) -> np.ndarray:
    """Notebook 02's Predict, as the course's client makes it: one channel, a PredictRequest, a deadline."""
    request = protobuf.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = SIGNATURE_NAME
    request.inputs[INPUT_NAME].CopyFrom(protobuf.np_to_protobuf(batch))
    with grpc.insecure_channel(target) as channel:
        method = channel.unary_unary(
            protobuf.PREDICT_METHOD,
            request_serializer=protobuf.PredictRequest.SerializeToString,
            response_deserializer=protobuf.PredictResponse.FromString,
        )
        response = method(request, timeout=120.0)  # generous: the model runs under emulation
    return protobuf.protobuf_to_np(response.outputs[OUTPUT_NAME])


def test_the_makefile_builds_both_images_for_arm64(arm64_images):
    for image in (arm64_images.model, arm64_images.gateway):
        assert architecture(image) == "arm64", image
        machine = run(["docker", "run", "--rm", "--platform", "linux/arm64", "--entrypoint", "uname", image, "-m"])
        assert machine.stdout.strip() == "aarch64", image


def test_the_arm64_pods_start_and_pass_their_probes_as_declared(arm64_pods):
    check_containers_run_as_declared(arm64_pods)
    for pod in arm64_pods.all():
        assert pod.ready and not pod.probe_failures("liveness"), pod.name


def test_the_arm64_model_server_answers_the_course_client_as_the_amd64_one_does(arm64_pods, model_base):
    batch = course_batch(PHOTO)
    with running_model_server(model_base, rest_api_port=0) as amd64:
        expected = course_predict(amd64.grpc_target, batch)
    started = time.monotonic()
    answers = [course_predict(f"{pod.ip}:{pod.port('grpc')}", batch) for pod in arm64_pods.models]
    seconds = (time.monotonic() - started) / len(answers)
    differences = [float(np.abs(answer - expected).max()) for answer in answers]
    note(f"arm64 model server under qemu: dense_7 within {max(differences):.1e} of amd64's, {seconds:.1f} s a call")
    assert max(differences) <= 1e-5


def test_an_upload_through_the_arm64_gateway_answers_with_the_amd64_top_class(arm64_pods, reference):
    status, _, answer = predict(arm64_pods)
    assert status == 200, answer
    assert list(answer) == list(CLASSES)
    assert max(answer, key=answer.get) == CLASSES[int(np.argmax(reference))]
    np.testing.assert_allclose(list(answer.values()), reference, atol=1e-4)


def test_the_arm64_pods_with_the_trained_model_answer_test_photos_as_in_process(
    dataset, arm64_base, arm64_images, trained_model_base, tmp_path
):
    """The model trained here (notebook 00) in the arm64 model-server image (its model layer the only change),
    behind the arm64 gateway, under qemu: on three test photos of each class, the top class of the model in
    process on amd64."""
    context = repository_context(trained_model_base, tmp_path / "context")
    seconds = make_build("build-model", context, arm64_base, MODEL_SERVER_ARM64_TRAINED_IMAGE)
    note(f"arm64 model-server image with the trained model: built in {seconds:.0f} s")
    pods = start_pods("arm64", MODEL_SERVER_ARM64_TRAINED_IMAGE, arm64_images.gateway, label=" with the trained model")
    try:
        report = real_answers.check_gateway(pods.gateway_url, dataset, per_class=3)
    finally:
        stop_pods(pods)
    note(
        f"arm64 pods with the trained model, under qemu: {report.correct} of {report.photos} test photos right, "
        f"logits within {report.largest_logit_difference:.2g} of amd64's in process"
    )
    assert report.photos == 30 and report.largest_logit_difference <= 1e-5 * report.largest_logit
