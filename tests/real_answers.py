"""Real answers from the model trained here (notebook 00) through any gateway that serves it: on every photo the
same top class as the model in process, and, on all the test photos, the accuracy notebook 00 reported.

    report = check_gateway(gateway.url, dataset)               # the 372 test photos
    report = check_gateway(gateway.url, dataset, per_class=3)  # three of each class (arm64 under emulation)

The gateway may run anywhere (gunicorn here, compose, a cluster's Service) as long as its model tier serves
trained/clothing-small.h5 as notebook 01 converts it. The answers in process are that file's, read by tf-keras and
fed keras-image-helper's arrays, as notebook 00 scored it; they are computed once per process and photo list.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

from conftest import TRAINED_H5
from contract import CLASSES

SUMMARY = TRAINED_H5.with_suffix(".json")
PHOTOS_PER_REQUEST = 8  # under the gateway's GATEWAY_MAX_IMAGES (16)


def summary() -> dict:
    """What notebook 00 wrote beside the model: its digest, recipe, timings and scores."""
    return json.loads(SUMMARY.read_text())


@functools.cache
def in_process_logits(photos: tuple[Path, ...]) -> np.ndarray:
    import training

    return training.predict_photos(training.load_h5(TRAINED_H5), list(photos))


def served_logits(
    gateway_url: str, photos: list[Path], timeout: float = 120, per_request: int = PHOTOS_PER_REQUEST
) -> np.ndarray:
    """The gateway's logits for each photo, uploaded as the files of a multipart request, several per request."""
    rows = []
    for start in range(0, len(photos), per_request):
        chunk = photos[start : start + per_request]
        files = [(f"photo{i}", (path.name, path.read_bytes(), "image/jpeg")) for i, path in enumerate(chunk)]
        response = requests.post(f"{gateway_url}/predict", files=files, timeout=timeout)
        assert response.status_code == 200, f"{chunk[0].name} and on: {response.status_code} {response.text[:300]}"
        answer = response.json()
        rows += [[one[name] for name in CLASSES] for one in (answer["predictions"] if len(chunk) > 1 else [answer])]
    return np.array(rows, dtype=np.float32)


@dataclass
class Report:
    photos: int
    correct: int  # served top class == the photo's folder
    largest_logit_difference: float  # served against in process, over every photo and class
    largest_logit: float  # the largest magnitude in process, the scale of the difference above

    @property
    def accuracy(self) -> float:
        return self.correct / self.photos


def check_gateway(
    gateway_url: str, dataset: Path, per_class: int | None = None, per_request: int = PHOTOS_PER_REQUEST
) -> Report:
    """The test photos (all, or the first `per_class` of each class) through the gateway at `gateway_url`: fails
    naming every photo whose served top class differs from the model's in process, and, on all of them, when the
    served accuracy is not the one in the summary."""
    import training

    split = training.list_split(dataset, "test", per_class)
    expected = in_process_logits(tuple(split.paths))
    served = served_logits(gateway_url, split.paths, per_request=per_request)
    differ = [
        f"{path.parent.name}/{path.name}: {CLASSES[mine]} in process, {CLASSES[theirs]} served"
        for path, mine, theirs in zip(split.paths, expected.argmax(1), served.argmax(1), strict=True)
        if mine != theirs
    ]
    assert not differ, f"{len(differ)} of {len(split)} photos answered differently: " + "; ".join(differ[:10])
    report = Report(
        photos=len(split),
        correct=int((served.argmax(1) == split.labels).sum()),
        largest_logit_difference=float(np.abs(served - expected).max()),
        largest_logit=float(np.abs(expected).max()),
    )
    if per_class is None:
        reported = summary()["test"]
        assert (report.correct, report.photos) == (reported["correct"], reported["photos"]), (
            f"served: {report.correct} of {report.photos} right; notebook 00 reported {reported['correct']} of "
            f"{reported['photos']}"
        )
    return report
