"""The gateway and model-server images, built from the project's Dockerfiles and run on a real engine.

Each runs locked down as its Kubernetes manifest runs it: its non-root user, a read-only root filesystem with
tmpfs where the manifest mounts an emptyDir, all capabilities dropped, no privilege escalation. Where no engine
answers these skip and say why; in CI (ZOOMCAMP_REQUIRE_DOCKER=1) they fail instead.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

import contract
import gateway
import photos
from engine import address, health, inspect, remove, run, unique, wait_healthy
from test_k8s import container as manifest_container
from test_k8s import pod_spec

pytestmark = pytest.mark.docker


def image_user(image: str) -> str:
    """The USER the image itself declares (what `docker run` without --user runs as)."""
    return run(["docker", "image", "inspect", "--format", "{{.Config.User}}", image]).stdout.strip()


def locked_down(name: str, deployment: str) -> list[str]:
    """`docker run` flags for the manifest's user, read-only root, capabilities and emptyDir mounts."""
    spec, item = pod_spec("base", deployment), manifest_container("base", deployment)
    security = {**spec["securityContext"], **item["securityContext"]}
    flags = ["--name", name, "--user", f"{security['runAsUser']}:{security['runAsGroup']}", "--read-only"]
    flags += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    for mount in item["volumeMounts"]:
        flags += ["--tmpfs", f"{mount['mountPath']}:mode=1777"]
    return flags


def test_gateway_image_runs_locked_down_and_turns_healthy(gateway_image):
    name = unique("zoomcamp-10-gateway-image")
    try:
        run(["docker", "run", "-d", *locked_down(name, "gateway"), gateway_image], timeout=60)
        seconds = wait_healthy(name, timeout=60)
        state = inspect(name)
        # The image itself runs as the manifest's user, so a plain `docker run` is not root either.
        assert image_user(gateway_image) == "10001:10001" == state["Config"]["User"]
        assert state["HostConfig"]["ReadonlyRootfs"] is True
        assert run(["docker", "exec", name, "id", "-u"]).stdout.strip() == "10001"
        # Nothing outside the emptyDir mounts is writable.
        denied = run(["docker", "exec", name, "touch", "/app/x"], check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
        run(["docker", "exec", name, "touch", "/tmp/x"])
        # The page ships in the image.
        page = requests.get(f"http://{address(name)}:{contract.GATEWAY_PORT}/", timeout=10)
        assert page.status_code == 200 and "<title>Clothing classifier</title>" in page.text
        # The gateway's runtime is TensorFlow-free: it speaks TF Serving's protobufs through protobuf.py.
        tf = run(["docker", "exec", name, "python", "-c", "import tensorflow"], check=False)
        assert tf.returncode != 0 and "No module named 'tensorflow'" in tf.stderr
        print(f"gateway image healthy after {seconds:.1f} s")
    finally:
        remove(name)


def _predict(target: str, batch: np.ndarray) -> np.ndarray:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = contract.MODEL_NAME
    request.model_spec.signature_name = contract.SIGNATURE_NAME
    request.inputs[contract.INPUT_NAME].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.float32))
    with grpc.insecure_channel(target) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    output = response.outputs[contract.OUTPUT_NAME]
    return np.array(output.float_val, dtype=np.float32).reshape([d.size for d in output.tensor_shape.dim])


def test_model_server_image_has_tf_servings_contract(model_server_image, standin_keras):
    """Ports 8500 and 8501, MODEL_NAME and MODEL_BASE_PATH, /models/clothing-model/1, arguments passed on."""
    name = unique("zoomcamp-10-model-server-image")
    try:
        # Extra arguments go to the server, as with tensorflow/serving.
        flags = locked_down(name, "clothing-model")
        run(["docker", "run", "-d", *flags, model_server_image, "--enable_batching",
             "--batching_parameters_file=/etc/tf-serving/batching.config"], timeout=60)  # fmt: skip
        seconds = wait_healthy(name, timeout=180)
        config = inspect(name)["Config"]
        environment = dict(item.split("=", 1) for item in config["Env"])
        assert (environment["MODEL_NAME"], environment["MODEL_BASE_PATH"]) == (contract.MODEL_NAME, "/models")
        assert set(config["ExposedPorts"]) == {f"{contract.GRPC_PORT}/tcp", f"{contract.REST_PORT}/tcp"}
        assert image_user(model_server_image) == "65534:65534" == config["User"]
        logs = run(["docker", "logs", name]).stderr
        assert f"from /models/{contract.MODEL_NAME}/1" in logs and "Batching on" in logs
        batch = np.stack([gateway.preprocess(photos.jpeg(seed), gateway.Settings()) for seed in range(3)])
        served = _predict(f"{address(name)}:{contract.GRPC_PORT}", batch)
        assert np.abs(served - standin_keras(batch, training=False).numpy()).max() <= 1e-4
        print(f"model-server image healthy after {seconds:.1f} s")

        # PID 1 is the server: SIGTERM is an orderly stop, before docker's SIGKILL after 10 s (exit code 137).
        run(["docker", "stop", name], timeout=30)
        assert inspect(name)["State"]["ExitCode"] == 0
        stopped = run(["docker", "logs", name]).stderr
        assert "SIGTERM: stopping" in stopped and "Stopped" in stopped
    finally:
        remove(name)


def test_model_server_image_says_what_is_wrong_with_a_bad_base_path(model_server_image):
    name = unique("zoomcamp-10-model-server-bad")
    try:
        run(["docker", "run", "--name", name, "-e", "MODEL_BASE_PATH=/nowhere", model_server_image], timeout=120,
            check=False)  # fmt: skip
        state = inspect(name)["State"]
        assert state["ExitCode"] == 1
        assert "/nowhere/clothing-model is not a directory" in run(["docker", "logs", name]).stderr
        assert health(name) in ("none", "starting", "unhealthy")
    finally:
        remove(name)
