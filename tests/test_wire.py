"""float32 or uint8 on the wire: notebook 01's second signature, and how the gateway finds, uses and leaves it."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

import gateway
from conftest import DATASET, PANTS
from contract import INPUT_NAME, MODEL_NAME, OUTPUT_NAME, SIGNATURE_NAME, UINT8_SIGNATURE_NAME
from gateway_parts.signatures import Route
from servers import RUNTIMES, running_model_server
from standin import export_float32_only

FLOAT32_BYTES, UINT8_BYTES = 299 * 299 * 3 * 4, 299 * 299 * 3


@pytest.fixture(scope="module", params=RUNTIMES)
def model_server(model_base, request):
    """The model tier on each runtime: the gateway's tests run against both."""
    with running_model_server(model_base, runtime=request.param, rest_api_port=0) as server:
        yield server


def _client(server, **settings) -> gateway.ModelClient:
    return gateway.ModelClient(gateway.Settings(tf_serving_host=server.grpc_target, **settings))


def test_notebook_01_exports_a_pixel_signature_beside_the_course_one(converted):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(converted.version_dir))
    assert set(loaded.signatures) == {SIGNATURE_NAME, UINT8_SIGNATURE_NAME}
    for name, dtype in ((SIGNATURE_NAME, tf.float32), (UINT8_SIGNATURE_NAME, tf.uint8)):
        _, inputs = loaded.signatures[name].structured_input_signature
        assert list(inputs) == [INPUT_NAME]
        assert inputs[INPUT_NAME].dtype == dtype
        assert inputs[INPUT_NAME].shape.as_list() == [None, 299, 299, 3]
        assert list(loaded.signatures[name].structured_outputs) == [OUTPUT_NAME]
    assert converted.result["signatures"] == sorted([SIGNATURE_NAME, UINT8_SIGNATURE_NAME])
    assert converted.result["uint8_max_abs_diff"] <= 1e-5


def test_the_gateway_sends_pixels_to_a_model_that_takes_them(model_server, photo_folder):
    client = _client(model_server)
    assert client.route(np.uint8) == Route(UINT8_SIGNATURE_NAME, INPUT_NAME, OUTPUT_NAME, "uint8")
    assert client.route(np.float32).wire == "float32"  # a batch already scaled goes to the course's signature
    app = gateway.create_app(gateway.Settings(tf_serving_host=model_server.grpc_target), client=client)
    answer = app.test_client().post(
        "/predict?detail=1", data=(photo_folder / PANTS).read_bytes(), content_type="image/jpeg"
    )
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["model"]["signature"] == UINT8_SIGNATURE_NAME
    assert answer.get_json()["model"]["wire"] == "uint8"


def test_a_pixel_request_is_a_quarter_of_the_bytes(model_server, photo_folder):
    pixels = gateway.pixels((photo_folder / PANTS).read_bytes(), gateway.Settings())[None]
    assert pixels.dtype == np.uint8
    sizes = {}
    for wire in ("uint8", "float32"):
        client = _client(model_server, wire=wire)
        sizes[wire] = client.predict_request(client.route(np.uint8), pixels).ByteSize()
    assert UINT8_BYTES < sizes["uint8"] < UINT8_BYTES + 100
    assert FLOAT32_BYTES < sizes["float32"] < FLOAT32_BYTES + 100


def _photos(photo_folder) -> list:
    """The made photos (plain, phone-sized, EXIF-rotated), and dataset photos when the dataset is beside the clone."""
    paths = sorted(photo_folder.rglob("*.jpg"))
    if (DATASET / "test").is_dir():
        real = sorted((DATASET / "test").rglob("*.jpg"))
        paths += real[:: max(1, len(real) // 40)]  # about 40, across the classes
    return paths


def test_logits_through_both_paths_agree_within_1e_5(model_server, photo_folder):
    settings = gateway.Settings()
    paths = _photos(photo_folder)
    clients = {wire: _client(model_server, wire=wire) for wire in ("uint8", "float32", "auto")}
    logits = {"uint8": [], "float32": [], "course": []}
    for start in range(0, len(paths), 16):  # batches of the gateway's size
        chunk = paths[start : start + 16]
        batch = np.stack([gateway.pixels(p.read_bytes(), settings) for p in chunk])
        for wire in ("uint8", "float32"):
            prediction = clients[wire].predict(batch)
            assert prediction.wire == wire
            assert prediction.signature == (UINT8_SIGNATURE_NAME if wire == "uint8" else SIGNATURE_NAME)
            logits[wire].append(prediction.logits)
        # The gateway's own float32 tensor (gateway.preprocess: Xception's scaling done in numpy) sends what the
        # float32 path sent. keras-image-helper, the course's preprocessing, is compared in the tests of tiers.
        course = np.stack([gateway.preprocess(p.read_bytes(), settings) for p in chunk])
        logits["course"].append(clients["auto"].predict(course).logits)
    by_pixels, by_floats, by_course = (np.concatenate(logits[k]) for k in ("uint8", "float32", "course"))
    difference = float(np.abs(by_pixels - by_floats).max())
    assert difference <= 1e-5, f"{len(paths)} photos: the paths differ by up to {difference:.2e}"
    np.testing.assert_array_equal(by_course, by_floats)


def test_a_model_with_only_the_course_signature_gets_float32(standin_keras, photo_folder, tmp_path):
    export_float32_only(standin_keras, tmp_path / "old" / "1")
    data = (photo_folder / PANTS).read_bytes()
    with running_model_server(tmp_path / "old", rest_api_port=0) as server:
        app = gateway.create_app(gateway.Settings(tf_serving_host=server.grpc_target))
        answer = app.test_client().post("/predict?detail=1", data=data, content_type="image/jpeg")
        assert answer.status_code == 200, answer.get_json()
        assert (answer.get_json()["model"]["signature"], answer.get_json()["model"]["wire"]) == (
            SIGNATURE_NAME,
            "float32",
        )
        forced = gateway.create_app(gateway.Settings(tf_serving_host=server.grpc_target, wire="uint8"))
        refused = forced.test_client().post("/predict", data=data, content_type="image/jpeg")
    assert refused.status_code == 502
    error = refused.get_json()["error"]
    assert error["code"] == "model_error"
    assert UINT8_SIGNATURE_NAME in error["message"] and "GATEWAY_WIRE=auto" in error["message"]


def test_a_new_version_without_the_pixel_signature_is_followed_within_the_request(
    model_base, standin_keras, photo_folder, tmp_path
):
    base = tmp_path / MODEL_NAME
    shutil.copytree(model_base / "1", base / "1")
    data = (photo_folder / PANTS).read_bytes()
    with running_model_server(base, rest_api_port=0, file_system_poll_wait_seconds=0.2) as server:
        app = gateway.create_app(gateway.Settings(tf_serving_host=server.grpc_target)).test_client()
        first = app.post("/predict?detail=1", data=data, content_type="image/jpeg").get_json()
        assert (first["model"]["version"], first["model"]["wire"]) == (1, "uint8")
        export_float32_only(standin_keras, tmp_path / "staged")
        os.replace(tmp_path / "staged", base / "2")
        deadline = time.monotonic() + 60
        while "Unloaded clothing-model version 1" not in server.log():  # version 2 served, version 1 gone
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.1)
        answer = app.post("/predict?detail=1", data=data, content_type="image/jpeg")
    assert answer.status_code == 200, answer.get_json()
    assert (answer.get_json()["model"]["version"], answer.get_json()["model"]["wire"]) == (2, "float32")


def test_gateway_wire_is_one_of_three():
    assert gateway.Settings.from_env({"GATEWAY_WIRE": "UINT8"}).wire == "uint8"
    assert gateway.Settings.from_env({}).wire == "auto"
    with pytest.raises(ValueError, match="GATEWAY_WIRE='int8': choose one of auto, float32, uint8"):
        gateway.Settings.from_env({"GATEWAY_WIRE": "int8"})
