"""Notebook 00 in its quick mode, converted by notebook 01 as the course's file is; and training.py, its helpers:
the dataset's layout, training inputs equal to what the served model computes, the course's format, the mirror
image and the scores."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import training
from conftest import NOTEBOOKS, ROOT
from contract import CLASSES, INPUT_NAME, OUTPUT_NAME, SIGNATURE_NAME, UINT8_SIGNATURE_NAME

SIZE = 32  # a small network input keeps these tests fast; the notebook's default is 96


@pytest.fixture(scope="module")
def network():
    return training.build_network(SIZE, filters=(8, 16), top=24)


def test_check_dataset_counts_the_photos_of_each_split_and_class(photo_folder):
    counts = training.check_dataset(photo_folder)
    assert list(counts) == ["train", "validation", "test"]
    assert all(list(per_class) == list(CLASSES) for per_class in counts.values())
    assert counts["test"]["pants"] == 4 and counts["test"]["dress"] == 3  # the made photos, and the pants one


def test_a_missing_dataset_says_what_to_clone_and_how_to_pass_it(tmp_path):
    with pytest.raises(training.DatasetMissing) as missing:
        training.check_dataset(tmp_path / "nowhere")
    message = str(missing.value)
    assert "nowhere" in message and "train/dress" in message
    assert "git clone https://github.com/alexeygrigorev/clothing-dataset-small" in message
    assert "make train CLOTHING_DATASET=" in message


def test_a_class_without_photos_is_named(tmp_path):
    for split in training.SPLITS:
        for name in CLASSES:
            (tmp_path / split / name).mkdir(parents=True)
            (tmp_path / split / name / "a.jpg").write_bytes(b"")
    (tmp_path / "validation" / "skirt" / "a.jpg").unlink()
    with pytest.raises(training.DatasetMissing, match="no .jpg photos in validation/skirt"):
        training.check_dataset(tmp_path)


def test_a_split_is_listed_by_class_then_name_and_labelled_by_folder(photo_folder):
    split = training.list_split(photo_folder, "test")
    assert len(split) == 31 and split.labels.tolist() == sorted(split.labels.tolist())
    assert all(path.parent.name == CLASSES[label] for path, label in zip(split.paths, split.labels, strict=True))
    assert [p.name for p in split.paths[:3]] == ["made-0.jpg", "made-1.jpg", "made-2.jpg"]
    assert len(training.list_split(photo_folder, "train", per_class=2)) == 20


def test_training_sees_the_photos_as_the_served_model_does_after_its_resize(network, photo_folder):
    """The arrays training learns from are what the saved model's resize layer makes of keras-image-helper's."""
    import tf_keras as keras
    from keras_image_helper import create_preprocessor

    split = training.list_split(photo_folder, "train", per_class=1)
    stored = training.load_for_training(split, SIZE)
    served = training.course_model(network, SIZE, test_time_flip=False)
    resize = keras.Model(served.input, served.get_layer("resize").output)
    helper = create_preprocessor("xception", target_size=(299, 299))
    sent = np.concatenate([helper.from_path(str(path)) for path in split.paths])
    assert stored.shape == (10, 2 * SIZE, 2 * SIZE, 3)
    np.testing.assert_allclose(stored, resize(sent).numpy(), atol=1e-6)


def test_the_course_model_has_the_course_names_shapes_and_ten_logits(network):
    model = training.course_model(network, SIZE)
    assert model.layers[0].name == INPUT_NAME and model.layers[-1].name == OUTPUT_NAME
    assert tuple(model.input.shape) == (None, 299, 299, 3) and model.input.dtype == "float32"
    assert tuple(model.output.shape) == (None, len(CLASSES))


def test_the_mirror_image_reverses_the_columns_exactly():
    import tf_keras as keras

    inputs = keras.Input((SIZE, SIZE, 3))
    mirrored = keras.Model(inputs, training.mirror(inputs, SIZE))
    x = np.random.default_rng(3).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_array_equal(mirrored(x).numpy(), x[:, :, ::-1])


def test_with_test_time_flip_the_answer_is_the_mean_of_the_photo_and_its_mirror_image(network):
    import tf_keras as keras

    x = np.random.default_rng(4).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
    flipped = training.course_model(network, SIZE, test_time_flip=True)
    small = keras.Model(flipped.input, flipped.get_layer("average_2x2").output)(x).numpy()
    expected = (network(small).numpy() + network(small[:, :, ::-1]).numpy()) / 2
    np.testing.assert_allclose(flipped(x).numpy(), expected, atol=1e-5)
    plain = training.course_model(network, SIZE, test_time_flip=False)
    np.testing.assert_allclose(plain(x).numpy(), network(small).numpy(), atol=1e-5)


def test_the_saved_file_is_keras_2_hdf5_and_answers_as_the_model_did(network, tmp_path):
    import h5py

    model = training.course_model(network, SIZE)
    path = training.save_h5(model, tmp_path / "model.h5")
    with h5py.File(path) as saved:
        assert saved.attrs["keras_version"].startswith("2.") and "training_config" not in saved.attrs
    x = np.random.default_rng(5).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
    np.testing.assert_array_equal(training.load_h5(path)(x).numpy(), model(x).numpy())


def test_batches_average_as_the_model_does_and_augment_for_training_only(network):
    import tf_keras as keras

    x = np.random.default_rng(6).uniform(-1, 1, (8, 2 * SIZE, 2 * SIZE, 3)).astype(np.float32)
    labels = np.arange(8) % len(CLASSES)
    augmented = next(iter(training.batches(x, labels, 8, training.augmenter(), seed=1)))
    plain_images, one_hot = next(iter(training.batches(x, labels, 8)))
    served = training.course_model(network, SIZE)
    average = keras.Sequential([keras.Input(x.shape[1:]), served.get_layer("average_2x2")])
    np.testing.assert_allclose(plain_images.numpy(), average(x).numpy(), atol=1e-6)
    np.testing.assert_array_equal(one_hot.numpy().argmax(axis=1), labels)
    # Shuffled too, so compared as sets of values: augmentation changed them.
    assert augmented[0].shape == (8, SIZE, SIZE, 3) and not np.allclose(
        np.sort(augmented[0].numpy(), axis=None), np.sort(plain_images.numpy(), axis=None)
    )


def test_augmentation_without_turns_zooms_or_shifts_mirrors_some_photos_and_leaves_the_others():
    x = np.random.default_rng(7).uniform(-1, 1, (16, 2 * SIZE, 2 * SIZE, 3)).astype(np.float32)
    y = training.augmenter(rotation=0.0, zoom=0.0, shift=0.0, seed=2)(x).numpy()
    unchanged = [np.array_equal(a, b) for a, b in zip(y, x, strict=True)]
    mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(y, x, strict=True)]
    assert all(u or m for u, m in zip(unchanged, mirrored, strict=True)) and 0 < sum(unchanged) < len(x)


def test_scores_count_rights_per_class_and_the_confusions():
    labels = np.array([0, 0, 1, 1, 1, 2])
    logits = np.eye(len(CLASSES))[[0, 1, 1, 1, 0, 2]]
    result = training.scores(labels, logits)
    assert result["accuracy"] == pytest.approx(4 / 6) and (result["correct"], result["photos"]) == (4, 6)
    assert result["per_class"]["dress"] == [1, 2] and result["per_class"]["hat"] == [2, 3]
    assert result["confusion"][0][1] == 1 and result["confusion"][1][0] == 1
    assert training.main_confusions(result["confusion"]) == [("hat", "dress", 1), ("dress", "hat", 1)]


# ---- notebook 00 --------------------------------------------------------------------------------------------------


def _execute(notebook: str, executed, **parameters) -> list[dict]:
    import papermill

    papermill.execute_notebook(
        str(NOTEBOOKS / notebook), str(executed), parameters=parameters, cwd=str(ROOT), progress_bar=False
    )
    return json.loads(executed.read_text())["cells"]


def test_notebook_00_quick_mode_trains_and_notebook_01_converts_its_file_as_the_course_file(photo_folder, tmp_path):
    """The quick mode (`make test`): three photos per class and split, one epoch, every cell; its file in the
    course's format, its summary true to the file; then notebook 01 makes a SavedModel of it with both signatures."""
    from conftest import tagged_result

    h5 = tmp_path / "trained" / "quick.h5"
    started = time.monotonic()
    cells = _execute(
        "00-train-a-small-model.ipynb",
        tmp_path / "00.ipynb",
        dataset_dir=str(photo_folder),
        output_h5=str(h5),
        quick=True,
    )
    print(f"notebook 00 in quick mode: {time.monotonic() - started:.0f} s")
    outputs = [o for c in cells for o in c.get("outputs", [])]
    shown = "".join("".join(o.get("text", "")) for o in outputs)
    assert "epoch  1/1: loss " in shown and "input input_8 (None, 299, 299, 3) float32" in shown
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3, "augmentations, curves, confusion matrix"
    summary = json.loads(h5.with_suffix(".json").read_text())
    assert summary["quick"] and summary["recipe"]["epochs"] == 1
    assert summary["photos"] == {"train": 30, "validation": 30, "test": 30}
    assert summary["sha256"] == training.sha256_of(h5) and summary["bytes"] == h5.stat().st_size
    assert sum(map(sum, summary["test"]["confusion"])) == 30 == summary["test"]["photos"]
    assert tagged_result(tmp_path / "00.ipynb")["test"]["correct"] == summary["test"]["correct"]

    started = time.monotonic()
    base = tmp_path / "models" / "clothing-model"
    _execute("01-convert-model.ipynb", tmp_path / "01.ipynb", model_h5=str(h5), output_base=str(base), version=1)
    print(f"notebook 01 on its file: {time.monotonic() - started:.0f} s")
    conversion = tagged_result(tmp_path / "01.ipynb")
    assert conversion["loaded_by"].startswith("tf-keras")  # Keras 3 refuses it as it refuses the course's file
    assert conversion["signatures"] == sorted([SIGNATURE_NAME, UINT8_SIGNATURE_NAME])
    assert conversion["signature"] == {"inputs": [INPUT_NAME], "outputs": [OUTPUT_NAME]}
    assert conversion["max_abs_diff"] <= 1e-5 and conversion["uint8_max_abs_diff"] <= 1e-5


def test_notebook_00_stops_at_once_where_the_photos_are_not(tmp_path):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as failed:
        _execute("00-train-a-small-model.ipynb", tmp_path / "00.ipynb", dataset_dir=str(tmp_path / "no-photos"))
    # The first cell after the parameters (papermill's injected ones count too), before any photo is read.
    assert failed.value.ename == "DatasetMissing" and failed.value.exec_count == 3
    assert "counts = training.check_dataset(dataset)" in failed.value.source
    assert "git clone https://github.com/alexeygrigorev/clothing-dataset-small" in failed.value.evalue
