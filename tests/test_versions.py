"""serving/runtime_tensorflow.py: a loaded version calls a one-input, one-output signature's graph directly, and only
where that gives the public call's answer."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf

from contract import INPUT_NAME, OUTPUT_NAME, SIGNATURE_NAME, UINT8_SIGNATURE_NAME
from serving import runtime_tensorflow


def loaded(model_base) -> runtime_tensorflow.TensorFlowVersion:
    version = runtime_tensorflow.TensorFlowVersion(1, model_base / "1")
    version.warm_up()
    return version


@pytest.fixture(scope="module")
def served(model_base) -> runtime_tensorflow.TensorFlowVersion:
    return loaded(model_base)


def test_both_signatures_take_the_direct_call_and_answer_as_the_public_call(served):
    pixels = np.random.default_rng(5).integers(0, 256, (3, 299, 299, 3), np.uint8)
    inputs = {SIGNATURE_NAME: (pixels / 127.5 - 1).astype(np.float32), UINT8_SIGNATURE_NAME: pixels}
    for name, value in inputs.items():
        signature = served.signatures[name]
        assert signature.direct is not None, name
        direct = served.run(signature, {INPUT_NAME: value})[OUTPUT_NAME]
        public = signature.function(**{INPUT_NAME: tf.constant(value)})[OUTPUT_NAME].numpy()
        assert direct.shape == (3, 10)
        np.testing.assert_allclose(direct, public, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fault", ["answers differently", "fails"])
def test_a_direct_call_that_does_not_match_keeps_the_public_call(model_base, monkeypatch, caplog, fault):
    def wrong(function):
        def call(tensor):
            if fault == "fails":
                raise RuntimeError("no such graph")
            return tf.ones([tf.shape(tensor)[0], 10])

        return call

    monkeypatch.setattr(runtime_tensorflow, "_direct_call", wrong)
    with caplog.at_level(logging.WARNING, logger="model_server"):
        version = loaded(model_base)
    assert all(signature.direct is None for signature in version.signatures.values())
    assert f"{SIGNATURE_NAME}: the direct call" in caplog.text and "using the public call" in caplog.text
    pixels = np.zeros((1, 299, 299, 3), np.uint8)
    answer = version.run(version.signatures[UINT8_SIGNATURE_NAME], {INPUT_NAME: pixels})[OUTPUT_NAME]
    assert not np.allclose(answer, 1.0)
