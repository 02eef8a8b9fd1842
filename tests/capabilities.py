"""What a test run may lack, each with the switch that makes its absence a failure instead of a skip.

`make test` runs what the machine can and skips the rest, saying why and naming the switch. `.ci/run` sets every
switch for what CI provides, so that there a missing piece is a broken build, not a quiet skip. CI cannot provide
the course model (no internet) or the tensorflow/serving image (no registry).
"""

from __future__ import annotations

import os

import pytest

DOCKER = "ZOOMCAMP_REQUIRE_DOCKER"  # a Docker engine with the compose and buildx plugins
ARM64 = "ZOOMCAMP_REQUIRE_ARM64"  # arm64 under emulation: qemu-aarch64 in binfmt_misc with the F flag
BROWSER = "ZOOMCAMP_REQUIRE_BROWSER"  # a Chromium for the page test
CLUSTER = "ZOOMCAMP_REQUIRE_CLUSTER"  # a Kubernetes cluster that kubectl reaches
DATASET = "ZOOMCAMP_REQUIRE_DATASET"  # the clothing photos beside the repository (CLOTHING_DATASET)
COURSE_MODEL = "ZOOMCAMP_REQUIRE_COURSE_MODEL"  # the course's model, downloadable or in models/
TF_SERVING = "ZOOMCAMP_REQUIRE_TF_SERVING"  # the tensorflow/serving image, pullable
IPV6 = "ZOOMCAMP_REQUIRE_IPV6"  # an IPv6 loopback (::1)
OPENSSL = "ZOOMCAMP_REQUIRE_OPENSSL"  # the openssl command, which makes the TLS tests' certificates
SWITCHES = (DOCKER, ARM64, BROWSER, CLUSTER, DATASET, COURSE_MODEL, TF_SERVING, IPV6, OPENSSL)


def required(switch: str) -> bool:
    return os.environ.get(switch) == "1"


def unavailable(reason: str, switch: str):
    """Skip, saying why and which switch makes it a failure; or fail, where that switch is set."""
    __tracebackhide__ = True  # pytest reports the test or fixture that called this, not this line
    if switch not in SWITCHES:
        raise ValueError(f"{switch} is not one of the switches: {', '.join(SWITCHES)}")
    if required(switch):
        pytest.fail(f"{reason} ({switch}=1: this machine is meant to run this test)")
    pytest.skip(f"{reason} (where it provides this, CI sets {switch}=1 and this skip becomes a failure)")
