"""arm64 as an Apple Silicon or Graviton user runs it: both images built for linux/arm64 by the Makefile's own
targets (the model tier on LiteRT, with the model trained here), and k8s/overlays/arm64 applied to the cluster,
whose kubelet starts them on this machine's Docker engine, under emulation (qemu-aarch64 in binfmt_misc); their
answers compared with amd64's.

The overlay holds its pods to arm64 nodes: they wait until the node is labelled arm64, as it would be on such a
machine (its kubelet sets kubernetes.io/arch). Everything arm64 runs under qemu here, several times slower than
natively; how fast arm64 hardware serves stays unmeasured. Without emulation or a cluster these tests skip and say
why; CI provides both and sets their switches, and then they fail instead.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

import capabilities
import protobuf
import real_answers
from cluster import (
    GATEWAY,
    MODEL,
    check_containers_as_declared,
    kubectl,
    kubectl_json,
    pods,
    predict,
    render,
    rollout,
    wait_for,
)
from contract import CLASSES, INPUT_NAME, MODEL_NAME, OUTPUT_NAME, SIGNATURE_NAME
from engine import (
    BINFMT_AARCH64,
    PHOTO,
    architecture,
    arm64_python_base,
    course_batch,
    image_size_mb,
    make_build,
    note,
    run,
    unique,
)
from servers import running_model_server

pytestmark = [pytest.mark.docker, pytest.mark.cluster]

# The model server on LiteRT with the model trained here (notebook 00), as trained_litert_image is for amd64.
MODEL_ARM64_IMAGE = "zoomcamp-10-model-server-litert:test-arm64-trained"
GATEWAY_ARM64_IMAGE = "zoomcamp-10-gateway:test-arm64"
ARCH = "kubernetes.io/arch"
# LiteRT's arm64 interpreter dies with SIGSEGV as it is created under qemu 7.2 (Debian 12's), and runs under 10.0
# (Debian 13's, which .ci/provision.sh registers): the oldest measured to run it.
QEMU_FOR_LITERT = (10, 0)


def qemu_version() -> tuple[int, int]:
    """The version of the qemu-aarch64 registered in binfmt_misc (its interpreter's --version)."""
    interpreter = next(line.split()[1] for line in BINFMT_AARCH64.read_text().splitlines() if line.startswith("interp"))
    shown = run([interpreter, "--version"]).stdout
    major, minor = re.search(r"version (\d+)\.(\d+)", shown).groups()
    return int(major), int(minor)


@pytest.fixture(scope="session")
def arm64_images(trained_context) -> SimpleNamespace:
    base = arm64_python_base()
    if qemu_version() < QEMU_FOR_LITERT:
        capabilities.unavailable(
            f"qemu-aarch64 {'.'.join(map(str, qemu_version()))} is registered: LiteRT's arm64 interpreter crashes "
            f"under it; register {'.'.join(map(str, QEMU_FOR_LITERT))} or newer (.ci/provision.sh shows how)",
            capabilities.ARM64,
        )
    arm64 = ["PLATFORM=linux/arm64", f"PYTHON_IMAGE={base}"]
    model = [*arm64, "MODEL_SERVER=litert", f"MODEL_SERVER_LITERT_IMAGE={MODEL_ARM64_IMAGE}"]
    model_seconds = make_build(trained_context, "build-model", MODEL_ARM64_IMAGE, model, "arm64 image")
    gateway = [*arm64, f"GATEWAY_IMAGE={GATEWAY_ARM64_IMAGE}"]
    gateway_seconds = make_build(trained_context, "build-gateway", GATEWAY_ARM64_IMAGE, gateway, "arm64 image")
    note(
        f"arm64 images (make build-model MODEL_SERVER=litert, build-gateway, PLATFORM=linux/arm64, under qemu): the "
        f"model server {image_size_mb(MODEL_ARM64_IMAGE):.0f} MB in {model_seconds:.0f} s, the gateway "
        f"{image_size_mb(GATEWAY_ARM64_IMAGE):.0f} MB in {gateway_seconds:.0f} s"
    )
    return SimpleNamespace(model=MODEL_ARM64_IMAGE, gateway=GATEWAY_ARM64_IMAGE)


@pytest.fixture(scope="module")
def arm64_deployed(cluster, arm64_images, tmp_path_factory):
    """k8s/overlays/arm64 with the arm64 images, in a namespace of its own: first with the node as it is (x86-64),
    where the pods must wait, then with the node labelled arm64, where they run under qemu."""
    namespace = unique("zoomcamp-10-arm64")
    images = {"zoomcamp-10-model-server-litert": arm64_images.model, "zoomcamp-10-gateway": arm64_images.gateway}
    # Under qemu a model call takes seconds, more on a busy machine: the gateway's deadline (10 s, for native speed)
    # is raised for emulation, the one change to the overlay besides render's own.
    emulation = {"PREDICT_TIMEOUT_SECONDS": "60"}
    manifests = render("arm64", cluster.minor, images, tmp_path_factory.mktemp("arm64-overlay"), emulation)
    own_arch = kubectl_json("get", "node", cluster.node)["metadata"]["labels"][ARCH]
    kubectl("create", "namespace", namespace)
    try:
        kubectl("apply", "-n", namespace, "-f", "-", stdin=manifests)
        waiting = wait_for(lambda: _unscheduled(namespace), 120, "the scheduler's verdict on the arm64 pods")
        kubectl("label", "node", cluster.node, f"{ARCH}=arm64", "--overwrite")
        started = time.monotonic()
        for deployment in (MODEL, GATEWAY):
            rollout(namespace, deployment)
        ready = time.monotonic() - started
        note(f"the arm64 overlay on the {own_arch} node: {waiting}; once labelled arm64, rolled out in {ready:.0f} s")
        yield SimpleNamespace(namespace=namespace, own_arch=own_arch, waiting=waiting, url=_service_url(namespace))
    finally:
        kubectl("label", "node", cluster.node, f"{ARCH}={own_arch}", "--overwrite", check=False)
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _unscheduled(namespace: str) -> str | None:
    """The scheduler's message once it has tried every pod of the namespace and placed none, else None."""
    items = kubectl_json("get", "pods", "-n", namespace)["items"]
    verdicts = [{c["type"]: c for c in p["status"].get("conditions", [])}.get("PodScheduled") for p in items]
    if not items or any(v is None or v["status"] != "False" for v in verdicts):
        return None
    return verdicts[0]["message"]


def _service_url(namespace: str) -> str:
    service = kubectl_json("get", "service", GATEWAY, "-n", namespace)
    return f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"


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


def test_the_arm64_pods_wait_for_an_arm64_node(arm64_deployed):
    assert arm64_deployed.own_arch == "amd64"
    assert "didn't match node selector" in arm64_deployed.waiting or "node affinity" in arm64_deployed.waiting


def test_the_kubelet_runs_the_arm64_pods_under_qemu_as_declared(arm64_deployed):
    check_containers_as_declared(arm64_deployed.namespace, machine="aarch64")


def test_the_arm64_model_server_answers_the_course_client_as_the_amd64_one_does(arm64_deployed, trained_model_base):
    batch = course_batch(PHOTO)
    with running_model_server(trained_model_base, rest_api_port=0) as amd64:
        expected = course_predict(amd64.grpc_target, batch)
    addresses = [p["status"]["podIP"] for p in pods(arm64_deployed.namespace, MODEL)]
    started = time.monotonic()
    answers = [course_predict(f"{address}:8500", batch) for address in addresses]
    seconds = (time.monotonic() - started) / len(answers)
    differences = [float(np.abs(answer - expected).max()) for answer in answers]
    note(
        f"arm64 LiteRT under qemu: dense_7 within {max(differences):.1e} of amd64 TensorFlow's, {seconds:.1f} s a call"
    )
    assert max(differences) <= 1e-5


def test_a_photo_through_the_arm64_gateway_service_gets_the_amd64_answer(arm64_deployed, trained_reference):
    status, _, answer = predict(arm64_deployed.url)
    assert status == 200, answer
    assert list(answer) == list(CLASSES)
    assert max(answer, key=answer.get) == CLASSES[int(np.argmax(trained_reference))]
    np.testing.assert_allclose(list(answer.values()), trained_reference, atol=1e-4)


def test_the_trained_model_on_the_arm64_pods_answers_test_photos_as_in_process(dataset, arm64_deployed):
    """Through the arm64 gateway's Service, under qemu, on one test photo of each class: the top class of the model
    in process on amd64."""
    # One photo a request: under qemu on a busy machine, a batch of 8 took longer than the gateway's 10 s deadline.
    report = real_answers.check_gateway(arm64_deployed.url, dataset, per_class=1, per_request=1)
    note(
        f"the arm64 pods with the trained model, under qemu: {report.correct} of {report.photos} test photos right, "
        f"logits within {report.largest_logit_difference:.2g} of amd64 TensorFlow's in process"
    )
    assert report.photos == 10 and report.largest_logit_difference <= 1e-5 * report.largest_logit
