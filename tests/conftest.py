"""Fixtures shared by the suite: the stand-in model, its conversion by notebook 01, the photo dataset."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import capabilities
from contract import MODEL_NAME

# The Docker harness (the engine checks, the images built once per session, the run's docker summary), and the
# Kubernetes cluster's.
pytest_plugins = ["engine", "cluster"]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# The photos live beside the repository, never in it; CLOTHING_DATASET points elsewhere if needed.
DATASET = Path(os.environ.get("CLOTHING_DATASET", ROOT.parent / "shared" / "data" / "clothing-dataset-small"))
# The course's example photo (its published logits are in test_course_model.py), relative to DATASET (and to
# photo_folder, which has a made photo by that name).
PANTS = "test/pants/4aabd82c-82e1-4181-a84d-d0c6e550d26d.jpg"
# The small model trained here from the course's photos (notebook 00): the offline default. Its summary: the .json.
TRAINED_H5 = ROOT / "trained" / "clothing-small.h5"

# Quiet TensorFlow's C++ start-up lines in this process and in every process the tests start.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def standin_h5(tmp_path_factory) -> Path:
    """The course-shaped stand-in model, saved as Keras-2 HDF5 (see tests/standin.py)."""
    from standin import save_standin_h5

    return made_once(tmp_path_factory, "standin", lambda folder: save_standin_h5(folder / "standin.h5")) / "standin.h5"


@pytest.fixture(scope="session")
def standin_keras(standin_h5):
    """The stand-in loaded in-process with tf-keras: the reference for numeric comparisons."""
    import tf_keras

    return tf_keras.models.load_model(standin_h5, compile=False)


@pytest.fixture(scope="session")
def converted(standin_h5, tmp_path_factory) -> SimpleNamespace:
    """Notebook 01 run by papermill on the stand-in, as `make model` runs it on the course model."""
    work = made_once(tmp_path_factory, "converted", lambda work: _convert(standin_h5, work))
    base, executed = work / "models" / MODEL_NAME, work / "01-convert-model.ipynb"
    return SimpleNamespace(base=base, version_dir=base / "1", notebook=executed, result=tagged_result(executed))


@pytest.fixture(scope="session")
def model_base(converted) -> Path:
    """A TF Serving base directory (<base>/1/saved_model.pb) holding the converted stand-in."""
    return converted.base


@pytest.fixture(scope="session")
def trained_model_base(tmp_path_factory) -> Path:
    """The trained model converted by notebook 01 (as `make trained-model` does) into a TF Serving base directory."""
    return made_once(tmp_path_factory, "trained", lambda work: _convert(TRAINED_H5, work)) / "models" / MODEL_NAME


def _convert(h5: Path, work: Path) -> None:
    """Notebook 01 on `h5`: version 1 in <work>/models/clothing-model, the executed notebook beside it."""
    import papermill

    papermill.execute_notebook(
        str(NOTEBOOKS / "01-convert-model.ipynb"),
        str(work / "01-convert-model.ipynb"),
        parameters={"model_h5": str(h5), "output_base": str(work / "models" / MODEL_NAME), "version": 1},
        cwd=str(ROOT),
        progress_bar=False,
    )


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder of the run's that `make(folder)` fills once: the workers of `pytest -n` share it (the first to ask
    makes it, the others wait for it), so a conversion that both need runs once. Nothing may change it afterwards."""
    run = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run = run.parent  # each worker's folder is inside the run's
    folder, done = run / f"made-once-{name}", run / f"made-once-{name}.done"
    with open(run / f"made-once-{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed to make it left it half made
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """Photos the suite makes itself (tests/photos.py), laid out like the dataset: <split>/<class>/<name>.jpg,
    with the course's pants photo at PANTS. test/ and validation/ hold plain 400x533 JPEGs like the dataset's (what
    keras-image-helper reads the same way as the gateway); train/ adds phone-sized 1600x1200 ones and ones with an
    EXIF orientation tag. What the tests use wherever real photos do not matter."""
    from contract import CLASSES
    from photos import PHOTO_SIZE, jpeg

    folder = tmp_path_factory.mktemp("photos")
    seed = 0
    for split in ("train", "validation", "test"):
        for name in CLASSES:
            (folder / split / name).mkdir(parents=True)
            for index in range(3):
                seed += 1
                varied = split == "train"
                size = (1600, 1200) if varied and index == 1 else PHOTO_SIZE
                orientation = 6 if varied and index == 2 else None
                photo = jpeg(seed, size, exif_orientation=orientation)
                (folder / split / name / f"made-{index}.jpg").write_bytes(photo)
    (folder / PANTS).write_bytes(jpeg(4242))
    return folder


@pytest.fixture(scope="session")
def dataset() -> Path:
    if not (DATASET / "test").is_dir():
        capabilities.unavailable(
            f"the clothing photos are not at {DATASET} (set CLOTHING_DATASET to their folder)", capabilities.DATASET
        )
    return DATASET


def tagged_result(executed_notebook: Path):
    """The value of the cell tagged `result` in an executed notebook (its text/plain repr)."""
    import ast

    cells = json.loads(executed_notebook.read_text())["cells"]
    cell = next(c for c in cells if "result" in c.get("metadata", {}).get("tags", []))
    text = "".join(next(o for o in cell["outputs"] if o.get("output_type") == "execute_result")["data"]["text/plain"])
    return ast.literal_eval(text)


def execute_notebook(notebook: Path, executed: Path, cwd: Path, **parameters) -> tuple[str, list[dict]]:
    """A notebook run top to bottom by papermill in `cwd`: the text it showed, and its cells' outputs in order."""
    import papermill

    papermill.execute_notebook(str(notebook), str(executed), parameters=parameters, cwd=str(cwd), progress_bar=False)
    outputs = [o for c in json.loads(executed.read_text())["cells"] for o in c.get("outputs", [])]
    texts = ["".join(o.get("data", {}).get("text/plain", "")) + "".join(o.get("text", "")) for o in outputs]
    return "".join(texts), outputs


# The slowest modules first (longest first, as measured): `make test`'s two workers each take whole modules in this
# order, so the long ones start at once and the short ones fill in around them, instead of two long ones meeting at
# the end.
SLOW_FIRST = [
    "test_cluster.py",
    "test_compose_stack.py",
    "test_arm64.py",
    "test_bench.py",
    "test_local_stack.py",
    "test_notebooks.py",
    "test_experiments.py",
    "test_load_and_faults.py",
    "test_gateway_e2e.py",
    "test_model_server.py",
    "test_training.py",
    "test_wire.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Each phase's report kept on its test (item.stash[PHASES]), so a fixture's teardown can tell that the test
    failed and show what explains it (test_cluster.py: the pods' last log lines)."""
    report = yield
    item.stash.setdefault(PHASES, {})[report.when] = report
    return report


PHASES = pytest.StashKey[dict]()
