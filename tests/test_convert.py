"""Notebook 01: the course's HDF5 model becomes a SavedModel with the course's signature."""

from __future__ import annotations

import http.server
import json
import threading

import numpy as np
import pytest
from testbook import testbook

from conftest import NOTEBOOKS
from contract import IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME, SIGNATURE_NAME

NOTEBOOK = NOTEBOOKS / "01-convert-model.ipynb"


def test_saved_model_is_written_in_tf_serving_layout(converted):
    assert converted.version_dir.is_dir()
    # Only the integer version directory is left: no staging or replaced copies beside it.
    assert [p.name for p in converted.base.iterdir()] == ["1"]
    assert (converted.version_dir / "saved_model.pb").is_file()
    assert (converted.version_dir / "variables").is_dir()


def test_signature_is_the_course_signature(converted):
    import tensorflow as tf

    signature = tf.saved_model.load(str(converted.version_dir)).signatures[SIGNATURE_NAME]
    _, inputs = signature.structured_input_signature
    assert list(inputs) == [INPUT_NAME]
    assert inputs[INPUT_NAME].dtype == tf.float32
    assert inputs[INPUT_NAME].shape.as_list() == [None, IMAGE_SIZE[1], IMAGE_SIZE[0], 3]
    outputs = signature.structured_outputs
    assert list(outputs) == [OUTPUT_NAME]
    assert outputs[OUTPUT_NAME].dtype == tf.float32
    assert outputs[OUTPUT_NAME].shape.as_list() == [None, 10]


def test_saved_model_computes_what_the_keras_model_computes(converted, standin_keras):
    import tensorflow as tf

    served = tf.saved_model.load(str(converted.version_dir)).signatures[SIGNATURE_NAME]
    batch = np.random.default_rng(1).uniform(-1, 1, (3, IMAGE_SIZE[1], IMAGE_SIZE[0], 3)).astype("float32")
    got = served(**{INPUT_NAME: tf.constant(batch)})[OUTPUT_NAME].numpy()
    expected = standin_keras(batch, training=False).numpy()
    assert got.shape == (3, 10)
    assert np.abs(got - expected).max() <= 1e-5


def test_executed_notebook_shows_the_courses_export_then_ours_with_saved_model_cli(converted):
    """saved_model_cli itself runs twice: on what the course's two lines wrote (serving_default only), then on our
    export (serving_default as the course's, and serving_uint8)."""
    outputs = [o for cell in json.loads(converted.notebook.read_text())["cells"] for o in cell.get("outputs", [])]
    text = "".join("".join(o.get("text", "")) for o in outputs)
    assert text.count("signature_def['serving_default']:") == 2 and text.count("signature_def['serving_uint8']:") == 1
    assert text.count("inputs['input_8'] tensor_info:") == 3 and text.count("outputs['dense_7'] tensor_info:") == 3
    assert "shape: (-1, 299, 299, 3)" in text and "shape: (-1, 10)" in text and "dtype: DT_UINT8" in text
    # The stand-in is written by Keras 2 exactly like the course file, which Keras 3 cannot read.
    assert converted.result["loaded_by"].startswith("tf-keras")
    assert "Keras 3" in text and "trying tf-keras" in text
    assert converted.result["max_abs_diff"] <= 1e-5


# ---- the notebook's functions, called through testbook ------------------------------------------

HDF5_BODY = b"\x89HDF\r\n\x1a\n" + bytes(4096)


class _ModelFiles(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/model.h5":
            self._send(HDF5_BODY)
        elif self.path == "/truncated.h5":
            self.send_response(200)
            self.send_header("Content-Length", str(len(HDF5_BODY)))
            self.end_headers()
            self.wfile.write(HDF5_BODY[:100])
        elif self.path == "/error-page.h5":
            self._send(b"<html>rate limited</html>")
        else:
            self.send_error(404)

    def _send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def file_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ModelFiles)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def nb():
    with testbook(NOTEBOOK, execute=["parameters", "setup", "download", "load", "export"], timeout=300) as tb:
        yield tb


def _download(nb, url, dest, sha256=""):
    nb.inject(f"download_model({url!r}, {str(dest)!r}, {sha256!r})", pop=True)


def test_download_writes_the_file_only_when_complete(nb, file_server, tmp_path):
    dest = tmp_path / "model.h5"
    _download(nb, f"{file_server}/model.h5", dest)
    assert dest.read_bytes() == HDF5_BODY
    assert list(tmp_path.iterdir()) == [dest]


@pytest.mark.parametrize(
    ("path", "sha256", "message"),
    [
        ("/truncated.h5", "", "stopped at"),
        ("/error-page.h5", "", "is not an HDF5 file"),
        ("/model.h5", "0" * 64, "expected " + "0" * 64),
        ("/missing.h5", "", "404"),
    ],
)
def test_failed_download_leaves_nothing_behind(nb, file_server, tmp_path, path, sha256, message):
    from testbook.exceptions import TestbookRuntimeError

    dest = tmp_path / "model.h5"
    with pytest.raises(TestbookRuntimeError) as raised:
        _download(nb, f"{file_server}{path}", dest, sha256)
    assert message in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_a_model_saved_by_keras_3_is_loaded_by_keras_3_and_exported_with_course_names(nb, tmp_path):
    import keras
    import tensorflow as tf

    inputs = keras.Input((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), name=INPUT_NAME)
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, strides=8)(inputs))
    keras.Model(inputs, keras.layers.Dense(10, name=OUTPUT_NAME)(pooled)).save(tmp_path / "k3.h5")

    base = tmp_path / "models"
    nb.inject(f"k3_model, k3_loader = load_keras_model({str(tmp_path / 'k3.h5')!r})", pop=True)
    assert nb.value("k3_loader").startswith("Keras 3")
    # Exporting twice replaces the version in place and leaves nothing else in the base directory.
    for _ in range(2):
        nb.inject(f"export_saved_model(k3_model, {str(base)!r}, 3)", pop=True)
    assert [p.name for p in base.iterdir()] == ["3"]
    signature = tf.saved_model.load(str(base / "3")).signatures[SIGNATURE_NAME]
    assert list(signature.structured_outputs) == [OUTPUT_NAME]
