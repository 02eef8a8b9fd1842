"""Notebook 03 in its quick mode, through papermill as `make test` runs it.

The quick mode makes a handful of calls per point, so its numbers prove only that each experiment ran:
these tests check the shape of the results (every experiment has finite, positive numbers and a saved
figure), never their values.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import psutil
import pytest

from conftest import NOTEBOOKS, ROOT

EXPERIMENTS = ("encoding", "grpc_vs_rest", "channel_reuse", "batching", "gateway_processes", "wire")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(model_base, photo_folder, tmp_path_factory):
    import papermill

    out = tmp_path_factory.mktemp("experiments")
    # The converted model is shared by both workers; a hard-linked copy gives this notebook's model servers
    # a path of their own, so the last test finds them and not another test's servers.
    shutil.copytree(model_base, out / "model", copy_function=os.link)
    started = time.monotonic()
    papermill.execute_notebook(
        str(NOTEBOOKS / "03-grpc-experiments.ipynb"),
        str(out / "03-grpc-experiments.ipynb"),
        parameters={
            "mode": "quick",
            "model_base_path": str(out / "model"),
            "dataset": str(photo_folder),
            "output_dir": str(out),
        },
        cwd=str(ROOT),
        progress_bar=False,
    )
    print(f"notebook 03, quick mode: {time.monotonic() - started:.0f} s")
    return out, json.loads((out / "results.json").read_text())


def _leaves(value, path=""):
    """(path, value) for every number or other scalar in nested dicts."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}/{key}")
    else:
        yield path, value


def test_every_experiment_has_positive_numbers_and_a_figure(quick_run):
    out, results = quick_run
    assert set(results["experiments"]) == set(EXPERIMENTS)
    for name in EXPERIMENTS:
        experiment = results["experiments"][name]
        assert experiment["question"].endswith("?"), name
        figure = out / experiment["figure"]
        assert figure.is_file() and figure.read_bytes().startswith(PNG_MAGIC), f"{name}: no PNG at {figure}"
        leaves = list(_leaves(experiment["numbers"]))
        assert len(leaves) >= 6, f"{name}: only {leaves}"
        for path, value in leaves:
            assert isinstance(value, int | float) and not isinstance(value, bool), f"{name}{path} = {value!r}"
            assert math.isfinite(value) and value > 0, f"{name}{path} = {value!r}"


def test_each_experiment_covers_what_it_compares(quick_run):
    _, results = quick_run
    experiments = results["experiments"]
    assert set(experiments["encoding"]["numbers"]["encoders"]) == {
        "tensor_content (ours)",
        "float_val (typed)",
        "tf.make_tensor_proto",
        "REST JSON",
    }
    for batch in ("batch_1", "batch_8"):
        assert set(experiments["grpc_vs_rest"]["numbers"][batch]) == {"grpc", "rest"}
    assert set(experiments["channel_reuse"]["numbers"]) == {"reused", "new_per_request"}
    batching = experiments["batching"]["numbers"]
    assert set(batching) == {"off", "on"} and batching["off"].keys() == batching["on"].keys()
    assert len(batching["off"]) >= 2  # at least two client concurrencies
    assert set(experiments["gateway_processes"]["numbers"]) == {"1", "2", "4"}
    assert set(experiments["gateway_processes"]["errors"]) == {"1", "2", "4"}
    wire = experiments["wire"]
    assert wire["signatures"] == {"float32": "serving_default", "uint8": "serving_uint8"}
    paths = wire["numbers"]["paths"]
    assert 3.99 < paths["float32"]["bytes"] / paths["uint8"]["bytes"] < 4.0  # 4x fewer, plus the same envelope
    assert wire["max_abs_logit_difference"] <= 1e-5


def test_the_results_state_the_mode_and_the_cpu_budget(quick_run):
    _, results = quick_run
    assert results["mode"] == "quick"
    assert results["machine"]["usable_cores"] >= 1 and results["machine"]["cpu"] and results["machine"]["date"]
    assert results["experiments"]["gateway_processes"]["cpu_cores"] == results["machine"]["usable_cores"]
    assert results["model"]


def test_the_notebook_stops_the_model_servers_it_started(quick_run):
    own_base = quick_run[0] / "model"  # where quick_run put the notebook's copy of the model

    def serving_ours(process):
        try:
            command = " ".join(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        return "model_server.py" in command and str(own_base) in command

    left = [p.pid for p in psutil.process_iter() if serving_ours(p)]
    assert not left, f"model servers still running after the notebook: {left}"
