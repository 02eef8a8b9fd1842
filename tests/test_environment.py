"""The locked environment: the gateway's runtime stays TensorFlow-free (`make test` also runs `pipenv verify`)."""

from __future__ import annotations

import json

from conftest import ROOT

LOCK = json.loads((ROOT / "Pipfile.lock").read_text())


def test_runtime_packages_hold_no_tensorflow():
    heavy = [name for name in LOCK["default"] if name.startswith(("tensorflow", "tf-", "keras", "jax", "torch"))]
    assert not heavy, f"[packages] must stay TensorFlow-free (the gateway image installs them): {heavy}"
    assert {"flask", "gunicorn", "grpcio", "protobuf", "numpy", "pillow", "prometheus-client"} <= set(LOCK["default"])


def test_runtime_and_development_pin_the_same_versions():
    """The tests run the gateway with the versions its image will have."""
    differ = {
        name: (spec["version"], LOCK["develop"][name]["version"])
        for name, spec in LOCK["default"].items()
        if name in LOCK["develop"] and spec["version"] != LOCK["develop"][name]["version"]
    }
    assert not differ


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci/run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
