"""The gateway's intake, preprocessing, answers and errors, with a stand-in model client.

End-to-end behaviour against a real model server lives in test_gateway_e2e.py.
"""

from __future__ import annotations

import base64
import http.server
import io
import logging
import threading
import time

import numpy as np
import pytest
from PIL import Image

import gateway
import photos
from contract import CLASSES, IMAGE_SIZE
from gateway_parts import intake
from gateway_parts.documents import api_document
from gateway_parts.errors import model_error
from gateway_parts.images import decode_image
from safe_fetch import FetchPolicy

# ---- preprocess: the course's numbers for ordinary photos, sensible ones for everything else ----------


def _jpeg(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", **save)
    return out.getvalue()


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _photos(folder, count):
    return sorted((folder / "test").rglob("*.jpg"))[:count]


def _assert_preprocess_is_keras_image_helpers(paths):
    from keras_image_helper import create_preprocessor

    course = create_preprocessor("xception", target_size=IMAGE_SIZE)
    settings = gateway.Settings()
    for path in paths:
        ours = gateway.preprocess(path.read_bytes(), settings)
        assert ours.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0], 3) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, course.from_path(str(path))[0], err_msg=path.name)


def test_preprocess_equals_keras_image_helper_on_made_photos(photo_folder):
    _assert_preprocess_is_keras_image_helpers(_photos(photo_folder, 10))


def test_preprocess_equals_keras_image_helper_on_dataset_photos(dataset):
    """Where the real photos are: 25 of them, the parity that matters most."""
    _assert_preprocess_is_keras_image_helpers(_photos(dataset, 25))


def test_grayscale_palette_and_cmyk_become_rgb():
    settings = gateway.Settings()
    gray = gateway.preprocess(_png(Image.new("L", (50, 40), 128)), settings)
    assert np.allclose(gray, 128 / 127.5 - 1, atol=1e-6)
    cmyk = gateway.preprocess(_jpeg(Image.new("CMYK", (50, 40), (0, 255, 255, 0))), settings)
    assert cmyk[..., 0].mean() > 0.9 and cmyk[..., 1].mean() < -0.8  # red stays red
    palette = Image.new("RGB", (50, 40), (0, 0, 255)).convert("P")
    assert gateway.preprocess(_png(palette), settings)[..., 2].min() > 0.99


def test_transparency_is_laid_on_white():
    settings = gateway.Settings()
    clear = gateway.preprocess(_png(Image.new("RGBA", (30, 30), (0, 0, 0, 0))), settings)
    assert np.allclose(clear, 1.0)
    palette = Image.new("P", (30, 30), 0)
    palette.info["transparency"] = 0
    assert np.allclose(gateway.preprocess(_png(palette), settings), 1.0)


def test_sixteen_bit_png_is_scaled_not_clipped():
    half = Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16))
    value = gateway.preprocess(_png(half), gateway.Settings())
    assert np.allclose(value, 128 / 127.5 - 1, atol=0.01)  # mid-gray, not white


def test_exif_orientation_is_applied():
    upright = Image.new("RGB", (300, 100), (255, 255, 255))
    upright.paste((0, 0, 0), (0, 0, 100, 100))  # black on the left
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated; viewers turn it 90 degrees counter-clockwise... back to upright
    stored = upright.transpose(Image.Transpose.ROTATE_270)
    ours = gateway.preprocess(_jpeg(stored, exif=exif, quality=95), gateway.Settings())
    expected = gateway.preprocess(_jpeg(upright, quality=95), gateway.Settings())
    assert np.abs(ours - expected).mean() < 0.05


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (40, 40), color) for color in ((255, 0, 0), (0, 255, 0))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    value = gateway.preprocess(out.getvalue(), gateway.Settings())
    assert value[..., 0].mean() > 0.9 and value[..., 1].mean() < -0.9


def test_large_jpeg_is_draft_decoded_to_at_least_twice_the_target():
    data = photos.jpeg(seed=3, size=(4000, 3000))
    decoded = decode_image(data, gateway.Settings().max_image_pixels)
    assert decoded.size[0] >= 2 * IMAGE_SIZE[0] and decoded.size[1] >= 2 * IMAGE_SIZE[1]
    assert decoded.size < (4000, 3000)
    full = decode_image(data, gateway.Settings().max_image_pixels, jpeg_draft=False)
    assert full.size == (4000, 3000)


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"<html>not an image</html>", 415, "unsupported_media_type"),
        (b"", 415, "unsupported_media_type"),
        ("truncated", 422, "undecodable_image"),
        ("huge", 413, "image_too_large"),
    ],
)
def test_bad_images_give_clear_errors(data, status, code):
    settings = gateway.Settings(max_image_pixels=1_000_000)
    if data == "truncated":
        data = _jpeg(Image.new("RGB", (200, 200), (10, 200, 30)))[:300]
    elif data == "huge":
        data = _png(Image.new("1", (2000, 1000)))  # small file, 2 megapixels once decoded
    with pytest.raises(gateway.GatewayError) as raised:
        gateway.preprocess(data, settings)
    assert (raised.value.status, raised.value.code) == (status, code)


# ---- settings --------------------------------------------------------------------------------------


def test_settings_from_environment():
    settings = gateway.Settings.from_env(
        {
            "TF_SERVING_HOST": "dns:///clothing-model-headless:8500",
            "PREDICT_TIMEOUT_SECONDS": "2.5",
            "GATEWAY_MAX_IMAGES": "4",
            "GATEWAY_JPEG_DRAFT": "off",
            "MODEL_INPUT": "x",
            "MODEL_OUTPUT": "y",
            "GATEWAY_MAX_INFLIGHT": "2",
            "GATEWAY_QUEUE_BUDGET": "0.5",
        }
    )
    assert (settings.max_inflight, settings.queue_budget) == (2, 0.5)
    assert settings.tf_serving_host == "dns:///clothing-model-headless:8500"
    assert (settings.predict_timeout, settings.max_images, settings.jpeg_draft) == (2.5, 4, False)
    assert (settings.input_name, settings.output_name) == ("x", "y")
    assert gateway.Settings.from_env({}).tf_serving_host == "localhost:8500"


@pytest.mark.parametrize(("name", "value"), [("PREDICT_TIMEOUT_SECONDS", "soon"), ("GATEWAY_MAX_IMAGES", "0")])
def test_bad_settings_name_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        gateway.Settings.from_env({name: value})


# ---- the app, with a model client that answers without a model server -----------------------------


class FakeModel:
    """Answers logits that encode each image's mean pixel (scaled as the course's signature takes it), so tests
    can tell which row is whose. The gateway hands its model client uint8 pixels: ModelClient scales them only
    when it sends float32. `entered` counts the calls that reached it, held or not (`release` holds them)."""

    def __init__(self):
        self.batches = []
        self.entered = 0
        self.release = threading.Event()
        self.release.set()
        self.error = None

    def predict(self, batch):
        self.entered += 1  # one assignment under the GIL: the test reads it from another thread
        self.release.wait(10)
        if self.error:
            raise self.error
        assert batch.dtype == np.uint8, batch.dtype
        self.batches.append(batch.shape)
        logits = np.zeros((len(batch), len(CLASSES)), np.float32)
        logits[:, 0] = gateway.scale(batch).mean(axis=(1, 2, 3))
        logits[:, 4] = 5.0
        return gateway.Prediction(logits=logits, model_version=7)

    def ready(self, timeout=2.0):
        return (self.error is None), "fake"


@pytest.fixture
def fake():
    return FakeModel()


@pytest.fixture
def client(fake):
    app = gateway.create_app(gateway.Settings(max_images=3, max_request_bytes=2_000_000), client=fake)
    return app.test_client()


RED = _png(Image.new("RGB", (64, 48), (255, 0, 0)))
BLACK = _png(Image.new("RGB", (64, 48), (0, 0, 0)))


def test_single_image_answers_the_course_shape(client):
    answer = client.post("/predict", json={"image": base64.b64encode(RED).decode()}).get_json()
    assert list(answer) == list(CLASSES)
    assert answer["pants"] == 5.0


def test_several_images_go_to_the_model_as_one_batch_in_order(client, fake):
    response = client.post("/predict", json={"images": [base64.b64encode(x).decode() for x in (RED, BLACK)]})
    predictions = response.get_json()["predictions"]
    assert fake.batches == [(2, IMAGE_SIZE[1], IMAGE_SIZE[0], 3)]
    assert predictions[0]["dress"] > predictions[1]["dress"]  # red is brighter than black
    assert predictions[1]["dress"] == pytest.approx(-1.0)


def test_multipart_upload_and_raw_image_body(client, fake):
    response = client.post("/predict", data={"a": (io.BytesIO(RED), "a.png"), "b": (io.BytesIO(BLACK), "b.png")})
    assert len(response.get_json()["predictions"]) == 2
    raw = client.post("/predict", data=RED, content_type="image/png").get_json()
    assert list(raw) == list(CLASSES)


def test_detail_is_an_explicit_opt_in(client):
    body = {"image": base64.b64encode(RED).decode()}
    detailed = client.post("/predict?detail=1&top_k=2", json=body).get_json()
    prediction = detailed["predictions"][0]
    assert [t["class"] for t in prediction["top"]][0] == "pants" and len(prediction["top"]) == 2
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0)
    assert detailed["model"] == {
        "name": "clothing-model",
        "version": 7,
        "signature": "serving_default",
        "wire": "float32",
    }
    assert set(detailed["timings_ms"]) == {"queue", "fetch", "preprocess", "predict", "total"}


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": "{not json", "content_type": "application/json"}, 400, "invalid_request"),
        ({"json": ["a list"]}, 400, "invalid_request"),
        ({"json": {"uri": "x"}}, 400, "invalid_request"),
        ({"json": {}}, 400, "invalid_request"),
        ({"json": {"url": 5}}, 400, "invalid_request"),
        ({"json": {"image": "***"}}, 400, "invalid_request"),
        ({"json": {"urls": "http://a"}}, 400, "invalid_request"),
        ({"json": {"url": "file:///etc/passwd"}}, 400, "invalid_url"),
        ({"json": {"url": "http://169.254.169.254/latest/meta-data/"}}, 400, "url_blocked"),
        ({"json": {"url": "http://127.0.0.1:9/x.jpg"}}, 400, "url_blocked"),
        ({"json": {"images": ["AAAA"] * 4}}, 413, "too_many_images"),
        ({"data": b"\xff" * 2_100_000, "content_type": "image/jpeg"}, 413, "request_too_large"),
        ({"json": {"image": base64.b64encode(b"GIF89a nope").decode()}}, 415, "unsupported_media_type"),
    ],
)
def test_client_faults_are_json_errors_with_a_request_id(client, kwargs, status, code):
    response = client.post("/predict", **kwargs)
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code
    assert response.get_json()["error"]["message"]
    assert len(response.headers["X-Request-ID"]) == 32


def test_unknown_routes_and_methods_are_json(client):
    assert client.get("/nope").get_json()["error"]["code"] == "not_found"
    assert client.get("/predict").status_code == 405
    assert client.get("/predict").get_json()["error"]["code"] == "method_not_allowed"


def test_request_id_is_kept_and_the_error_is_logged_once_with_it(client, caplog):
    with caplog.at_level(logging.WARNING, logger="gateway"):
        response = client.post("/predict", json={}, headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway"]
    assert len(lines) == 1 and "abc-123" in lines[0] and "invalid_request" in lines[0]


def test_model_tier_faults_map_to_5xx(client, fake):
    import grpc

    class RpcError(grpc.RpcError):
        def __init__(self, status):
            self.status = status

        def code(self):
            return self.status

        def details(self):
            return "details"

    body = {"image": base64.b64encode(RED).decode()}
    for status, http_status, code in [
        (grpc.StatusCode.UNAVAILABLE, 503, "model_unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "model_timeout"),
        (grpc.StatusCode.INVALID_ARGUMENT, 502, "model_error"),
    ]:
        fake.error = model_error(RpcError(status), "model:8500")
        response = client.post("/predict", json=body)
        assert (response.status_code, response.get_json()["error"]["code"]) == (http_status, code)
    assert client.get("/readyz").status_code == 503
    fake.error = None
    assert client.get("/readyz").get_json()["status"] == "ready"


def test_unexpected_failures_are_json_500_without_traceback(client, fake):
    fake.error = ZeroDivisionError("secret internals")
    response = client.post("/predict", json={"image": base64.b64encode(RED).decode()})
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "internal_error"
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in response.get_data(as_text=True)


def test_metrics_and_openapi(client):
    client.post("/predict", json={"image": base64.b64encode(RED).decode()})
    client.post("/predict", json={})
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'gateway_requests_total{endpoint="/predict",status="200"}' in metrics
    assert 'gateway_errors_total{code="invalid_request"}' in metrics
    assert 'gateway_stage_seconds_count{stage="preprocess"}' in metrics
    assert client.get("/openapi.json").get_json() == api_document()


def test_the_api_document_is_valid_openapi_and_names_exactly_the_apps_routes(client):
    """Written by hand, so held to the code: every route and method the app serves is in it, and nothing else (the
    answers are held to it by schemathesis, in test_load_and_faults.py)."""
    from openapi_spec_validator import validate

    document = api_document()
    validate(document)
    served = {
        (rule.rule, method.lower())
        for rule in client.application.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert served == {(path, method) for path, operations in document["paths"].items() for method in operations}
    # What the document repeats of the contract and the code, held to them.
    scores = document["components"]["schemas"]["Scores"]
    assert list(scores["properties"]) == scores["required"] == list(CLASSES)
    top = document["components"]["schemas"]["DetailedPredictions"]["properties"]["predictions"]["items"]
    assert top["properties"]["top"]["items"]["properties"]["class"]["enum"] == list(CLASSES)
    request_id_header = next(p for p in document["paths"]["/predict"]["post"]["parameters"] if p["in"] == "header")
    assert request_id_header["schema"]["pattern"] == intake._REQUEST_ID.pattern


# ---- URLs: fetched safely, localhost only when allowed ----------------------------------------------


@pytest.fixture(scope="module")
def photo_server():
    class Photos(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(RED)))
            self.end_headers()
            self.wfile.write(RED)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Photos)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_are_fetched_when_the_host_is_allowed(fake, photo_server):
    allowed = gateway.Settings(fetch=FetchPolicy(allow_hosts=frozenset({"127.0.0.1"})))
    answer = gateway.create_app(allowed, client=fake).test_client().post("/predict", json={"url": photo_server})
    assert answer.status_code == 200 and list(answer.get_json()) == list(CLASSES)
    refused = (
        gateway.create_app(gateway.Settings(), client=fake).test_client().post("/predict", json={"url": photo_server})
    )
    assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "url_blocked"


def test_a_batch_of_urls_is_fetched_in_parallel_within_one_deadline(fake):
    """8 URLs, each answered 0.5 s late: one after another that is 4 s; fetched together, under 1.5 s."""

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            time.sleep(0.5)
            body = RED if self.path.endswith("red") else BLACK
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        allowed = gateway.Settings(fetch=FetchPolicy(allow_hosts=frozenset({"127.0.0.1"})))
        app = gateway.create_app(allowed, client=fake).test_client()
        urls = [f"{base}/{i}-{'red' if i % 2 else 'black'}" for i in range(8)]
        started = time.monotonic()
        answer = app.post("/predict", json={"urls": urls})
        seconds = time.monotonic() - started
        assert answer.status_code == 200, answer.get_json()
        assert seconds < 1.5, f"8 slow URLs took {seconds:.2f} s"
        # In request order: the fake model's "dress" logit is the image's mean (red -1/3, black -1).
        assert [p["dress"] > -0.5 for p in answer.get_json()["predictions"]] == [i % 2 == 1 for i in range(8)]
        # The batch shares one deadline: a host slower than the fetch timeout fails the whole request in time.
        quick = gateway.Settings(fetch=FetchPolicy(allow_hosts=frozenset({"127.0.0.1"}), total_timeout=0.3))
        started = time.monotonic()
        late = gateway.create_app(quick, client=fake).test_client().post("/predict", json={"urls": urls[:4]})
        assert late.status_code == 422 and late.get_json()["error"]["code"] == "url_timeout"
        assert time.monotonic() - started < 1.0
    finally:
        server.shutdown()


def test_a_model_tier_found_down_fails_fast_until_the_reconnect_window_passes():
    from servers import free_port

    client = gateway.ModelClient(gateway.Settings(tf_serving_host=f"127.0.0.1:{free_port()}", predict_timeout=5.0))
    batch = np.zeros((1, IMAGE_SIZE[1], IMAGE_SIZE[0], 3), np.float32)
    timings = []
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(gateway.GatewayError) as raised:
            client.predict(batch)
        timings.append(time.monotonic() - started)
        assert raised.value.status == 503 and raised.value.code == "model_unavailable"
    first, second = timings
    assert first >= 1.5  # waited for a connection that might have been coming back
    assert second < 1.0  # then knew the tier was down
