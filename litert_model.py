"""Notebook 01's LiteRT half: the model as model.tflite with the SavedModel's signatures under their own names, and
the check that LiteRT answers as TensorFlow does on the same photos.

TensorFlow's converter has two paths to several signatures, and neither keeps the names by itself (measured with
TensorFlow 2.21): `from_saved_model(dir, signature_keys=[...])` converts serving_default only and drops the others
without a word, and `from_concrete_functions` keeps every function but names each signature after its Python
function (`serve`, `serve_uint8`). So each served function is wrapped in a tf.function named after its signature
(`serving_default`, `serving_uint8`): the .tflite file then carries the real names, which every LiteRT user sees,
and model_server.py --runtime=litert serves them as they are.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

import contract
from gateway_parts.images import decode_image, scale, to_rgb

MODEL_FILE = "model.tflite"  # beside saved_model.pb in each version folder (serving/runtime_litert.py reads it)
# A photo's pixels at most, as the gateway's default (GATEWAY_MAX_IMAGE_PIXELS): the dataset's are 400x533.
MAX_PIXELS = 40_000_000


def named_function(name: str, function):
    """`function` (a tf.function with an input_signature) as a tf.function named `name`: the converter names the
    signature of a concrete function after it."""
    import tensorflow as tf

    def call(*args):
        return function(*args)

    call.__name__ = name
    return tf.function(call, input_signature=function.input_signature)


def convert(signatures: dict, trackable) -> bytes:
    """The functions {signature name: tf.function} of `trackable` (the module holding the model's variables) as one
    .tflite flatbuffer, each signature under its name."""
    import tensorflow as tf

    functions = [named_function(name, function).get_concrete_function() for name, function in signatures.items()]
    return tf.lite.TFLiteConverter.from_concrete_functions(functions, trackable).convert()


def write_model(signatures: dict, trackable, directory: Path) -> Path:
    """convert() written to `directory`/model.tflite, through a temporary file, so that no reader sees half a file."""
    data = convert(signatures, trackable)
    target = Path(directory) / MODEL_FILE
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{MODEL_FILE}.")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(temporary, 0o644)  # readable as the SavedModel's files are (mkstemp makes it the owner's only)
    os.replace(temporary, target)
    return target


def signature_list(path: Path) -> dict:
    """{signature: {"inputs": [...], "outputs": [...]}} as LiteRT's interpreter reads the file."""
    return signature_list_of(Path(path).read_bytes())


def signature_list_of(model: bytes) -> dict:
    """signature_list() of a model in memory."""
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=model).get_signature_list()


def photo_pixels(folder: Path, limit: int | None = None) -> tuple[list[Path], np.ndarray]:
    """The JPEGs under `folder` (sorted) as the gateway feeds them to the model: decoded, RGB, resized to 299x299
    with NEAREST, uint8 (N x 299 x 299 x 3)."""
    from PIL import Image

    paths = sorted(Path(folder).rglob("*.jpg"))[:limit]
    pixels = [
        np.asarray(to_rgb(decode_image(p.read_bytes(), MAX_PIXELS)).resize(contract.IMAGE_SIZE, Image.NEAREST))
        for p in paths
    ]
    return paths, np.stack(pixels).astype(np.uint8) if pixels else np.zeros((0, 299, 299, 3), np.uint8)


def compare(version_dir: Path, pixels: np.ndarray, batch: int = 8) -> dict:
    """Both signatures run by TensorFlow (the SavedModel) and by LiteRT (model.tflite) on the same pixels, the float32
    one on them scaled as the gateway scales them: per signature, the largest difference of a logit, the largest
    logit, the one relative to the other (float32 rounding grows with the logits' size), and how many images get
    another top class."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    saved = tf.saved_model.load(str(version_dir)).signatures
    interpreter = Interpreter(model_path=str(Path(version_dir) / MODEL_FILE))
    feeds = {contract.SIGNATURE_NAME: scale(pixels), contract.UINT8_SIGNATURE_NAME: pixels}
    result = {}
    for name, values in feeds.items():
        runner = interpreter.get_signature_runner(name)
        tensorflow, litert = [], []
        for start in range(0, len(values), batch):
            chunk = values[start : start + batch]
            tensorflow.append(saved[name](**{contract.INPUT_NAME: tf.constant(chunk)})[contract.OUTPUT_NAME].numpy())
            litert.append(runner(**{contract.INPUT_NAME: chunk})[contract.OUTPUT_NAME])
        tensorflow, litert = np.concatenate(tensorflow), np.concatenate(litert)
        difference, largest = float(np.abs(tensorflow - litert).max()), float(np.abs(tensorflow).max())
        result[name] = {
            "images": len(values),
            "max_abs_diff": difference,
            "max_abs_logit": largest,
            "max_rel_diff": difference / largest if largest else difference,
            "top_class_differs": int((tensorflow.argmax(1) != litert.argmax(1)).sum()),
        }
    return result
