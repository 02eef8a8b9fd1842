"""The model trained here (notebook 00), committed as the offline default: small, the very file its summary
describes, converted by notebook 01 as the course's file is, and giving real answers when served: through the
gateway under gunicorn in front of model_server.py, on each of the 372 test photos, the top class of the model in
process, and the accuracy notebook 00 reported."""

from __future__ import annotations

import pytest

import real_answers
import training
from conftest import TRAINED_H5
from contract import INPUT_NAME, OUTPUT_NAME, SIGNATURE_NAME, UINT8_SIGNATURE_NAME
from gateways import running_gateway
from servers import running_model_server


def test_the_committed_file_is_small_and_the_one_its_summary_describes():
    summary = real_answers.summary()
    assert TRAINED_H5.stat().st_size < 10 * 2**20
    assert summary["sha256"] == training.sha256_of(TRAINED_H5) and summary["bytes"] == TRAINED_H5.stat().st_size
    assert not summary["quick"] and summary["photos"] == {"train": 3068, "validation": 341, "test": 372}
    # Issue 31 aims at 83 % on the test photos (its probe's 83.3 %); the committed file reaches 85.5 % (318 of 372).
    # The floor here only catches a file that no longer classifies well.
    assert summary["test"]["accuracy"] >= 0.80


def test_it_is_in_the_course_format_and_notebook_01_serves_both_signatures(trained_model_base):
    import tensorflow as tf

    model = training.load_h5(TRAINED_H5)
    assert (model.layers[0].name, model.layers[-1].name) == (INPUT_NAME, OUTPUT_NAME)
    assert tuple(model.input.shape) == (None, 299, 299, 3) and tuple(model.output.shape) == (None, 10)
    signatures = tf.saved_model.load(str(trained_model_base / "1")).signatures
    assert {SIGNATURE_NAME, UINT8_SIGNATURE_NAME} <= set(signatures)


@pytest.mark.parametrize("runtime", ["tensorflow", "litert"])
def test_served_top_class_is_the_in_process_one_on_every_test_photo(dataset, trained_model_base, tmp_path, runtime):
    """The gateway under gunicorn in front of model_server.py on either runtime (the SavedModel, or notebook 01's
    model.tflite), as `make serve` runs them offline."""
    with (
        running_model_server(trained_model_base, rest_api_port=0, runtime=runtime) as server,
        running_gateway(server.grpc_target, tmp_path) as gateway,
    ):
        report = real_answers.check_gateway(gateway.url, dataset)
    print(
        f"served on {runtime}: {report.correct} of {report.photos} right ({report.accuracy:.1%}), the top class of "
        f"the model in process on every photo; logits within {report.largest_logit_difference:.2g} of its "
        f"(the largest: {report.largest_logit:.3g})"
    )
    assert report.photos == 372
    # As the model server's own tests hold each runtime: a share of the largest logit.
    assert report.largest_logit_difference <= 1e-5 * report.largest_logit
