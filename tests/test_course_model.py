"""The real course model reproduces the course's published answer for the pants photo.

The only test that needs the internet: it downloads xception_v4_large_08_0.894.h5 (once, into
models/ as `make model` does), converts it with notebook 01 and classifies the pants photo with
keras-image-helper's 'xception' preprocessor. Where the model cannot be downloaded it skips, saying so.
"""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

import capabilities
from conftest import DATASET, NOTEBOOKS, PANTS, ROOT
from contract import CLASSES, IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME, SIGNATURE_NAME

PANTS_URL = "http://bit.ly/mlbookcamp-pants"
# Published in the course (module 10) for the pants photo.
COURSE_PANTS_LOGITS = {
    "dress": -1.868290,
    "hat": -4.761245,
    "longsleeve": -2.316983,
    "outwear": -1.062570,
    "pants": 9.887159,
    "shirt": -2.812433,
    "shoes": -3.666283,
    "shorts": 3.200361,
    "skirt": -2.602338,
    "t-shirt": -4.835045,
}


def _model_url() -> str:
    cells = json.loads((NOTEBOOKS / "01-convert-model.ipynb").read_text())["cells"]
    parameters = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    namespace: dict = {}
    exec("".join(parameters["source"]), namespace)  # noqa: S102 (the notebook's own parameters cell)
    return namespace["model_url"]


@pytest.mark.network
def test_course_model_reproduces_published_pants_logits(tmp_path):
    import papermill
    import tensorflow as tf
    from keras_image_helper import create_preprocessor

    url = _model_url()
    local = ROOT / "models" / url.rsplit("/", 1)[1]
    if not local.is_file():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
        except OSError as error:
            capabilities.unavailable(
                f"the course model is not reachable from here ({url}: {error})", capabilities.COURSE_MODEL
            )

    base = tmp_path / "clothing-model"
    papermill.execute_notebook(
        str(NOTEBOOKS / "01-convert-model.ipynb"),
        str(tmp_path / "01.ipynb"),
        parameters={"output_base": str(base)},
        cwd=str(ROOT),
        progress_bar=False,
    )
    preprocessor = create_preprocessor("xception", target_size=IMAGE_SIZE)
    photo = DATASET / PANTS
    batch = preprocessor.from_path(str(photo)) if photo.is_file() else preprocessor.from_url(PANTS_URL)
    served = tf.saved_model.load(str(base / "1")).signatures[SIGNATURE_NAME]
    logits = served(**{INPUT_NAME: tf.constant(batch)})[OUTPUT_NAME].numpy()[0]
    assert dict(zip(CLASSES, logits.tolist(), strict=True)) == pytest.approx(COURSE_PANTS_LOGITS, abs=1e-3)
    assert CLASSES[int(np.argmax(logits))] == "pants"
