"""Notebook 01's LiteRT model: model.tflite beside the SavedModel, with both signatures under their own names, and
answering as TensorFlow does on the dataset's test photos."""

from __future__ import annotations

import numpy as np

import litert_model
from contract import INPUT_NAME, OUTPUT_NAME, SIGNATURE_NAME, UINT8_SIGNATURE_NAME

# The largest logit difference allowed between TensorFlow and LiteRT, as a share of the largest logit: notebook 01's
# litert_max_rel_diff. Measured on the 372 test photos: 1.1e-6 on the stand-in (3.1e-7 of 0.27), 1.2e-6 on the
# Xception-size model (1.9e-10 of 1.6e-4), both random weights.
TOLERANCE = 1e-5


def test_the_tflite_file_has_both_signatures_under_their_own_names(converted):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(converted.version_dir / litert_model.MODEL_FILE))
    assert interpreter.get_signature_list() == {
        name: {"inputs": [INPUT_NAME], "outputs": [OUTPUT_NAME]} for name in (SIGNATURE_NAME, UINT8_SIGNATURE_NAME)
    }
    for name, dtype in ((SIGNATURE_NAME, np.float32), (UINT8_SIGNATURE_NAME, np.uint8)):
        (tensor,) = interpreter.get_signature_runner(name).get_input_details().values()
        assert tensor["dtype"] == dtype and list(tensor["shape_signature"]) == [-1, 299, 299, 3]
    assert converted.result["litert_signatures"] == [SIGNATURE_NAME, UINT8_SIGNATURE_NAME]


def test_named_functions_keep_their_names_where_the_saved_model_path_drops_one(tmp_path):
    """Why litert_model wraps the functions: converting the SavedModel with both keys keeps serving_default only."""
    import tensorflow as tf

    class Two(tf.Module):
        def __init__(self):
            super().__init__()
            self.scale = tf.Variable(2.0)

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x * self.scale}

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.uint8, name="x")])
        def serve_uint8(self, x):
            return {"y": tf.cast(x, tf.float32) * self.scale}

    module = Two()
    signatures = {SIGNATURE_NAME: module.serve, UINT8_SIGNATURE_NAME: module.serve_uint8}
    tf.saved_model.save(module, str(tmp_path), signatures=signatures)
    keys = list(signatures)
    dropped = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path), signature_keys=keys).convert()
    assert set(litert_model.signature_list_of(dropped)) == {SIGNATURE_NAME}
    kept = litert_model.convert(signatures, module)
    assert set(litert_model.signature_list_of(kept)) == set(keys)


def test_litert_answers_as_tensorflow_on_every_test_photo(converted, dataset):
    paths, pixels = litert_model.photo_pixels(dataset / "test")
    assert len(paths) >= 300, f"only {len(paths)} photos under {dataset / 'test'}"
    found = litert_model.compare(converted.version_dir, pixels)
    for name in (SIGNATURE_NAME, UINT8_SIGNATURE_NAME):
        assert found[name]["images"] == len(paths)
        assert found[name]["max_rel_diff"] <= TOLERANCE, found
        assert found[name]["top_class_differs"] == 0, found


def test_the_notebook_checked_litert_and_says_on_what(converted):
    parity = converted.result["litert_parity"]
    assert set(parity) == {SIGNATURE_NAME, UINT8_SIGNATURE_NAME}
    assert all(p["max_rel_diff"] <= TOLERANCE and p["top_class_differs"] == 0 for p in parity.values())
    assert converted.result["litert_checked_on"].split()[1] in ("photos", "random")


def test_photo_pixels_are_the_gateways(photo_folder):
    """litert_model reads a photo exactly as the gateway preprocesses it (decode, RGB, NEAREST to 299x299)."""
    import gateway

    paths, pixels = litert_model.photo_pixels(photo_folder / "test", 2)
    assert pixels.shape == (2, 299, 299, 3) and pixels.dtype == np.uint8
    for path, array in zip(paths, pixels, strict=True):
        np.testing.assert_array_equal(array, gateway.pixels(path.read_bytes(), gateway.Settings()))
