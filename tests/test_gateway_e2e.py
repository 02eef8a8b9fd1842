"""Gateway -> model server -> SavedModel, for real: gunicorn, gRPC, the converted stand-in, photos the suite makes."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests

import gateway
from conftest import PANTS, ROOT
from contract import CLASSES, IMAGE_SIZE
from gateways import free_port, running_gateway
from servers import RUNTIMES, running_model_server
from standin import export_float32_only


@pytest.fixture(scope="module", params=RUNTIMES)
def model_server(model_base, request):
    """The model tier on each runtime: the gateway's tests run against both."""
    with running_model_server(model_base, runtime=request.param, rest_api_port=0) as server:
        yield server


@pytest.fixture(scope="module")
def photos(photo_folder):
    """The photo folder over HTTP on 127.0.0.1, as a stranger's image host."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(photo_folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def served(model_server, tmp_path_factory):
    with running_gateway(
        model_server.grpc_target, tmp_path_factory.mktemp("gateway"), FETCH_ALLOW_HOSTS="127.0.0.1"
    ) as gw:
        yield gw


def _keras_logits(standin_keras, paths):
    from keras_image_helper import create_preprocessor

    preprocessor = create_preprocessor("xception", target_size=IMAGE_SIZE)
    batch = np.concatenate([preprocessor.from_path(str(p)) for p in paths])
    return standin_keras(batch, training=False).numpy()


def test_the_course_request_works_unchanged(served, photos, photo_folder, standin_keras):
    answer = requests.post(f"{served.url}/predict", json={"url": f"{photos}/{PANTS}"}, timeout=30).json()
    assert list(answer) == list(CLASSES)
    expected = _keras_logits(standin_keras, [photo_folder / PANTS])[0]
    np.testing.assert_allclose(list(answer.values()), expected, atol=1e-4)


def test_a_batch_of_photos_equals_in_process_keras(served, photo_folder, standin_keras):
    paths = [sorted((photo_folder / "validation" / name).glob("*.jpg"))[0] for name in CLASSES[:8]]
    files = {f"image{i}": (p.name, p.read_bytes(), "image/jpeg") for i, p in enumerate(paths)}
    response = requests.post(f"{served.url}/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    got = np.array([list(p.values()) for p in response.json()["predictions"]])
    np.testing.assert_allclose(got, _keras_logits(standin_keras, paths), atol=1e-4)


def test_ready_and_request_id_under_gunicorn(served):
    ready = requests.get(f"{served.url}/readyz", timeout=5)
    assert ready.status_code == 200 and "AVAILABLE" in ready.json()["detail"]
    bad = requests.post(f"{served.url}/predict", json={"url": "http://10.0.0.1/x.jpg"}, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "url_blocked"
    assert bad.headers["X-Request-ID"] in served.log()


def _served_count(samples, endpoint: str) -> float:
    """The gateway_requests_total count of 200 answers for `endpoint` among metric families' samples."""
    return sum(
        sample.value
        for family in samples
        for sample in family.samples
        if sample.name == "gateway_requests_total" and sample.labels == {"endpoint": endpoint, "status": "200"}
    )


def test_metrics_add_up_across_gunicorn_workers(model_server, tmp_path):
    """/metrics answers for both workers, whichever answers it: the count of a route only this test calls, as each
    worker's own file holds it (prometheus_client's multiprocess mode) and as /metrics sums them, once both workers
    have answered some of the calls."""
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.parser import text_string_to_metric_families

    files = tmp_path / "metrics"
    files.mkdir()
    endpoint, sent, by_worker = "/openapi.json", 0, {}
    with running_gateway(model_server.grpc_target, tmp_path, workers=2, PROMETHEUS_MULTIPROC_DIR=str(files)) as gw:
        deadline = time.monotonic() + 60
        while len([n for n in by_worker.values() if n]) < 2:  # until each worker has answered at least once
            assert sent < 500 and time.monotonic() < deadline, f"one worker took all {sent} connections: {by_worker}"
            requests.get(f"{gw.url}{endpoint}", headers={"Connection": "close"}, timeout=5)
            sent += 1
            counters = files.glob("counter_*.db")
            by_worker = {f.name: _served_count(MultiProcessCollector.merge([str(f)]), endpoint) for f in counters}
        shown = _served_count(
            text_string_to_metric_families(requests.get(f"{gw.url}/metrics", timeout=5).text), endpoint
        )
    assert sum(by_worker.values()) == sent and shown == sent, (sent, by_worker, shown)


def test_the_gateway_never_loads_tensorflow(model_server, photo_folder):
    code = f"""
import sys
import gateway
app = gateway.create_app(gateway.Settings(tf_serving_host={model_server.grpc_target!r}))
data = open({str(photo_folder / PANTS)!r}, "rb").read()
response = app.test_client().post("/predict", data=data, content_type="image/jpeg")
assert response.status_code == 200, response.get_data(as_text=True)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_serving", "keras", "tf_keras")))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_model_server_down_gives_503_fast_and_recovers_without_gateway_restart(model_base, photo_folder, tmp_path):
    port = free_port()
    data = (photo_folder / PANTS).read_bytes()
    headers = {"Content-Type": "image/jpeg"}
    with (
        running_model_server(model_base, port=port, rest_api_port=0) as first,
        running_gateway(f"127.0.0.1:{port}", tmp_path, PREDICT_TIMEOUT_SECONDS="20") as gw,
    ):
        assert requests.post(f"{gw.url}/predict", data=data, headers=headers, timeout=10).status_code == 200
        first.stop()
        started = time.monotonic()
        down = requests.post(f"{gw.url}/predict", data=data, headers=headers, timeout=30)
        # A down model server is a 503 at once (after a short wait for a reconnect), never a wait for the deadline.
        assert down.status_code == 503 and down.json()["error"]["code"] == "model_unavailable", down.text
        assert time.monotonic() - started < 10, "answered far inside the 20 s deadline"
        assert requests.get(f"{gw.url}/readyz", timeout=5).status_code == 503
        pid = gw.process.pid
        with running_model_server(model_base, port=port, rest_api_port=0):
            deadline = time.monotonic() + 30
            while (
                status := requests.post(f"{gw.url}/predict", data=data, headers=headers, timeout=10).status_code
            ) != 200 and time.monotonic() < deadline:
                time.sleep(0.25)
            assert status == 200
            assert gw.process.pid == pid and gw.process.poll() is None


def test_tensor_names_are_discovered_from_model_metadata(standin_keras, photo_folder, tmp_path):
    base = tmp_path / "renamed"
    export_float32_only(standin_keras, base / "1", "images", "scores")
    with running_model_server(base, rest_api_port=0) as server:
        client = gateway.ModelClient(gateway.Settings(tf_serving_host=server.grpc_target))
        assert client.tensor_names() == ("images", "scores")
        app = gateway.create_app(gateway.Settings(tf_serving_host=server.grpc_target), client=client)
        answer = app.test_client().post("/predict", data=(photo_folder / PANTS).read_bytes(), content_type="image/jpeg")
    assert answer.status_code == 200
    np.testing.assert_allclose(
        list(answer.get_json().values()), _keras_logits(standin_keras, [photo_folder / PANTS])[0], atol=1e-4
    )


def test_several_model_servers_share_the_requests_round_robin(model_base, photo_folder, tmp_path):
    second = tmp_path / "second"
    shutil.copytree(model_base / "1", second / "2")  # the same model as version 2, to tell the servers apart
    data = (photo_folder / PANTS).read_bytes()
    with running_model_server(model_base, rest_api_port=0) as one, running_model_server(second, rest_api_port=0) as two:
        target = f"ipv4:{one.grpc_target},{two.grpc_target}"
        client = gateway.create_app(gateway.Settings(tf_serving_host=target)).test_client()

        def version() -> int:
            answer = client.post("/predict?detail=1", data=data, content_type="image/jpeg").get_json()
            return answer["model"]["version"]

        # round_robin uses a server once its connection is up: first, until both have answered.
        seen = set()
        for _ in range(40):
            seen.add(version())
            if seen == {1, 2}:
                break
        versions = [version() for _ in range(12)]
    assert seen == {1, 2}, "both model servers answer"
    assert versions.count(1) == versions.count(2) == 6, versions  # round robin: each in turn
