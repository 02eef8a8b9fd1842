"""A Docker engine for the tests: whether one answers, the Python base image, image builds and containers.

Where no engine answers, the container tests skip and say why. Where `.ci/run` provisioned one, it sets
ZOOMCAMP_REQUIRE_DOCKER=1, and the same conditions fail instead: in CI a missing piece is a broken build. The
same holds for arm64 under emulation (qemu-aarch64 in binfmt_misc) and ZOOMCAMP_REQUIRE_ARM64=1.

The Dockerfiles take their Python base as a build argument, the official image by default. Where that image
cannot be pulled (a machine without a registry), the harness makes a stand-in from Debian packages with
mmdebstrap, with this machine's CA bundle, and says so in the test run's summary.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import http.server
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

import capabilities
import photos
from conftest import ROOT

DOCKERFILES = ROOT / "dockerfiles"
STANDIN_IMAGE = "zoomcamp-10-python-standin:3.11"
ARM64_STANDIN_IMAGE = "zoomcamp-10-python-standin:3.11-arm64"
BINFMT_AARCH64 = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
# Lines for the end of the test run (conftest's pytest_terminal_summary prints them once).
NOTES: list[str] = []
# The run's pytest config and the test being run: one-time builds print to the terminal as they go, and pause
# that test's timeout (pytest_configure and pytest_runtest_protocol below).
_CONFIG: pytest.Config | None = None
_RUNNING: pytest.Item | None = None


def note(line: str) -> None:
    if line not in NOTES:
        NOTES.append(line)
        print(f"[docker] {line}")


def say(line: str) -> None:
    """A line in the run's log as it happens, not held with the test's captured output: a reader of a slow or
    timed-out run sees which build it was in."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    capture = _CONFIG.pluginmanager.getplugin("capturemanager") if _CONFIG else None
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if worker:  # a worker of `pytest -n`: its standard output goes nowhere, its standard error to the run's log
            os.write(2, f"\n[build {time.strftime('%H:%M:%S')} {worker}] {line}\n".encode())
        else:
            sys.stdout.write(f"\n[build {time.strftime('%H:%M:%S')}] {line}\n")
            sys.stdout.flush()


BUILD_LOCK = Path(tempfile.gettempdir()) / "zoomcamp-10-one-time-build.lock"

# Each one-time build's allowance in seconds: over twice its slowest cold time measured on a 2-core CI machine
# (docs/testing.md has the times). A build is not the test's work: the test that happens to need it first does not
# pay for it out of its own timeout.
BUDGETS = {
    "base": 300,  # the stand-in Python base from Debian packages (amd64)
    "arm64 base": 300,  # the same for arm64 (its linker cache made under qemu)
    "image": 900,  # an amd64 image
    "arm64 image": 1800,  # an arm64 image, built under qemu
}


@contextlib.contextmanager
def one_time_build(what: str, kind: str):
    """Run a build shared by the session: say when it starts and how long it took, give it BUDGETS[kind] seconds
    (the caller's commands take that as their timeout), and stop the running test's timeout meanwhile. The test
    gets its whole timeout again afterwards. One build runs at a time on this machine: the workers of `pytest -n`
    need the same images, and the second to ask finds the first one's layers in Docker's cache."""
    budget = BUDGETS[kind]
    item = _RUNNING
    paused = _pause_timeout(item)
    try:
        with open(BUILD_LOCK, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"{what}: waiting for another worker's build")
                fcntl.flock(lock, fcntl.LOCK_EX)
            say(f"{what}: started (allowed {budget} s)")
            started = time.monotonic()
            try:
                yield budget
            except BaseException as error:  # a failure, a skip or the budget's timeout: say which, then go on
                say(f"{what}: stopped after {time.monotonic() - started:.0f} s ({type(error).__name__})")
                raise
            say(f"{what}: done in {time.monotonic() - started:.0f} s")
    finally:
        if paused:
            _resume_timeout(item)


def _pause_timeout(item: pytest.Item | None) -> bool:
    """Stop pytest-timeout's timer of the running test, if it set one (its own cancel hook)."""
    if item is None or not getattr(item, "cancel_timeout", None):
        return False
    item.config.hook.pytest_timeout_cancel_timer(item=item)
    item.cancel_timeout = None
    return True


def _resume_timeout(item: pytest.Item) -> None:
    """Set the test's timer again, with its own settings (marker, ini or command line)."""
    import pytest_timeout

    item.config.hook.pytest_timeout_set_timer(item=item, settings=pytest_timeout._get_item_settings(item))


def pytest_configure(config: pytest.Config) -> None:
    global _CONFIG
    _CONFIG = config


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item):
    global _RUNNING
    _RUNNING = item
    try:
        yield
    finally:
        _RUNNING = None


def unavailable(reason: str, switch: str = capabilities.DOCKER):
    """Skip, or fail where CI provides what is missing: capabilities.unavailable, Docker's switch by default."""
    __tracebackhide__ = True
    capabilities.unavailable(reason, switch)


def run(command: list[str], timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """A command whose output is kept for the error message when it fails."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and result.returncode != 0:
        shown = " ".join(map(str, command))
        raise AssertionError(f"`{shown}` exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def succeeds(command: list[str], timeout: float = 30) -> bool:
    """The command ran and exited 0 (a missing program or a timeout is a no)."""
    try:
        return subprocess.run(command, capture_output=True, timeout=timeout, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.cache
def engine_problem() -> str | None:
    """Why the container tests cannot run here, or None."""
    if not shutil.which("docker"):
        return "docker is not installed"
    if not succeeds(["docker", "info"], timeout=20):
        return "no Docker engine answers (`docker info` failed or timed out)"
    if not succeeds(["docker", "compose", "version"]):
        return "the Docker Compose plugin is missing (`docker compose version` failed)"
    if not succeeds(["docker", "buildx", "version"]):
        return (
            "the buildx plugin is missing (`docker buildx version` failed): BuildKit reads per-Dockerfile .dockerignore"
        )
    return None


def require_engine() -> None:
    problem = engine_problem()
    if problem:
        unavailable(problem)


def image_exists(image: str) -> bool:
    return succeeds(["docker", "image", "inspect", image])


@functools.cache
def pullable(image: str) -> bool:
    """Present, or pulled now (a machine without a registry fails fast)."""
    return image_exists(image) or succeeds(["docker", "pull", image], timeout=900)


def dockerfile_arg(dockerfile: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    assert match, f"{dockerfile.name} has no ARG {name}=<default>"
    return match.group(1)


def _debian_sources() -> tuple[str, str | None]:
    """This machine's Debian suite and the archive its apt sources name (None: mmdebstrap's default)."""
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    if release.get("ID") != "debian" or not release.get("VERSION_CODENAME"):
        raise RuntimeError("a stand-in base is made from Debian packages, and this machine is not Debian")
    uris = []
    sources = Path("/etc/apt")
    for path in [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]:
        if path.suffix not in (".list", ".sources", "") or not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if words and words[0] in ("deb", "URIs:"):
                uris += [word for word in words[1:] if re.fullmatch(r"[a-z]+://\S+/debian/?", word)]
    return release["VERSION_CODENAME"].strip('"'), (uris[0] if uris else None)


def _debian_rootfs(rootfs: Path, architecture: str, timeout: float) -> str:
    """A minimal Debian root filesystem with Python 3, venv and useradd, as a tar at `rootfs`. Returns the suite.

    The packages are unpacked, not installed: their maintainer scripts never run. For arm64 those would run under
    qemu, and Python's, which byte-compile the standard library, took most of the 258-284 s such a base took here;
    unpacked, it takes about 35 s. What those scripts would have made that the images need is made here: the users
    and groups (base-passwd's), the linker's cache, the standard library's bytecode, and this machine's trust store
    in place of ca-certificates' (pip reaches the package index through it). libstdc++ comes with apt in Debian's
    smallest images, and numpy needs it."""
    if not shutil.which("mmdebstrap"):
        raise RuntimeError("mmdebstrap is not installed, so no stand-in base can be made (apt install mmdebstrap)")
    suite, mirror = _debian_sources()
    command = [
        "mmdebstrap",
        "--variant=extract",
        f"--architectures={architecture}",
        "--include=?essential",
        "--include=python3,python3-venv,passwd,libstdc++6",
        "--aptopt=APT::Install-Recommends false",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        '--extract-hook=cp "$1/usr/share/base-passwd/passwd.master" "$1/etc/passwd"',
        '--extract-hook=cp "$1/usr/share/base-passwd/group.master" "$1/etc/group"',
        '--extract-hook=chroot "$1" /sbin/ldconfig',
        # The standard library byte-compiled here, natively, as Python's own scripts would have: bytecode is the
        # same on every architecture, and without it every Python started under qemu compiles what it imports.
        f'--extract-hook={sys.executable} -m compileall -q -j0 -s "$1" -p / "$1/usr/lib/python3.11"',
        '--extract-hook=mkdir -p "$1/etc/ssl/certs"',
        "--extract-hook=copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs",
        suite,
        str(rootfs),
        *([mirror] if mirror else []),
    ]
    run(command, timeout=timeout)
    return suite


def _make_base(image: str, architecture: str, kind: str) -> None:
    """A stand-in Python base for `architecture` (amd64, arm64), kept in the engine between runs. `FROM scratch` +
    `ADD` built with --platform labels it with its architecture, which `docker import` does not on every engine."""
    started = time.monotonic()
    what = f"the {architecture} stand-in Python base {image}"
    with one_time_build(what, kind) as budget, tempfile.TemporaryDirectory() as work:
        suite = _debian_rootfs(Path(work) / "rootfs.tar", architecture, timeout=budget)
        description = f"stand-in Python base made from Debian {suite} {architecture} packages"
        certificates = "/etc/ssl/certs/ca-certificates.crt"
        (Path(work) / "Dockerfile").write_text(
            f"FROM scratch\nADD rootfs.tar /\nENV PIP_CERT={certificates} SSL_CERT_FILE={certificates}\n"
            f'LABEL org.opencontainers.image.description="{description}"\nCMD ["python3"]\n'
        )
        run(["docker", "build", "--platform", f"linux/{architecture}", "-t", image, work], timeout=budget)
    platform = ["--platform", f"linux/{architecture}"]
    found = run(["docker", "run", "--rm", *platform, image, "sh", "-c", "uname -m; python3 --version"]).stdout.split()
    note(f"made the stand-in base {image} ({' '.join(found)}, Debian {suite}) in {time.monotonic() - started:.0f} s")


@functools.cache
def python_base() -> str:
    """The PYTHON_IMAGE to build with: the Dockerfiles' default where it can be had, else the stand-in."""
    official = dockerfile_arg(DOCKERFILES / "image-gateway.dockerfile", "PYTHON_IMAGE")
    if pullable(official):
        note(f"Python base: {official}")
        return official
    note(f"the official base {official} cannot be pulled here: building on a stand-in made from Debian packages")
    if not image_exists(STANDIN_IMAGE):
        try:
            _make_base(STANDIN_IMAGE, "amd64", "base")
        except (RuntimeError, AssertionError, OSError) as error:
            unavailable(f"no Python base image: {official} cannot be pulled, and no stand-in could be made: {error}")
    else:
        note(f"using the stand-in base {STANDIN_IMAGE} made earlier")
    return STANDIN_IMAGE


# ---- arm64 under emulation -------------------------------------------------------------------------------


@functools.cache
def arm64_problem() -> str | None:
    """Why arm64 images cannot be built and run here, or None: an engine, qemu-aarch64 registered with the F flag
    (the interpreter opened at registration, so containers need nothing of it), and mmdebstrap with arch-test."""
    problem = engine_problem()
    if problem:
        return problem
    if not BINFMT_AARCH64.is_file():
        return "no arm64 emulation: qemu-aarch64 is not registered in binfmt_misc (apt install qemu-user-static)"
    lines = BINFMT_AARCH64.read_text().splitlines()
    flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags:")), "")
    if lines[:1] != ["enabled"]:
        return "no arm64 emulation: qemu-aarch64 is registered in binfmt_misc but disabled (update-binfmts --enable)"
    if "F" not in flags:
        return f"qemu-aarch64 is registered without the F flag (flags: {flags!r}): containers cannot find qemu"
    missing = [tool for tool in ("mmdebstrap", "arch-test") if not shutil.which(tool)]
    if missing:
        return f"{' and '.join(missing)} not installed: no arm64 base can be made (apt install mmdebstrap arch-test)"
    return None


def architecture(image: str) -> str:
    return run(["docker", "image", "inspect", "--format", "{{.Architecture}}", image]).stdout.strip()


@functools.cache
def arm64_python_base() -> str:
    """A Python base for arm64 builds: a stand-in made from Debian's arm64 packages (_make_base)."""
    problem = arm64_problem()
    if problem:
        unavailable(problem, capabilities.ARM64)
    if image_exists(ARM64_STANDIN_IMAGE) and architecture(ARM64_STANDIN_IMAGE) == "arm64":
        note(f"using the arm64 stand-in base {ARM64_STANDIN_IMAGE} made earlier")
        return ARM64_STANDIN_IMAGE
    try:
        _make_base(ARM64_STANDIN_IMAGE, "arm64", "arm64 base")
    except (RuntimeError, AssertionError, OSError) as error:
        unavailable(f"no arm64 Python base could be made: {error}", capabilities.ARM64)
    return ARM64_STANDIN_IMAGE


def build(dockerfile: Path, tag: str, context: Path = ROOT, build_args: dict[str, str] | None = None) -> float:
    """`docker build` as `make build` runs it, on python_base(); returns the seconds it took."""
    args = {"PYTHON_IMAGE": python_base(), **(build_args or {})}
    command = ["docker", "build", "-f", str(dockerfile), "-t", tag]
    for name, value in args.items():
        command += ["--build-arg", f"{name}={value}"]
    # Builds reach the package index from the host's network: on machines like CI's, the bridge does not.
    command += ["--network", "host", str(context)]
    started = time.monotonic()
    with one_time_build(f"the image {tag} ({dockerfile.name})", "image") as budget:
        run(command, timeout=budget)
    return time.monotonic() - started


def image_size_mb(image: str) -> float:
    return int(run(["docker", "image", "inspect", "--format", "{{.Size}}", image]).stdout) / 1e6


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def inspect(container: str) -> dict:
    return json.loads(run(["docker", "inspect", container]).stdout)[0]


def address(container: str, network: str | None = None) -> str:
    networks = inspect(container)["NetworkSettings"]["Networks"]
    return networks[network]["IPAddress"] if network else next(iter(networks.values()))["IPAddress"]


def health(container: str) -> str:
    return inspect(container)["State"].get("Health", {}).get("Status", "none")


def wait_healthy(container: str, timeout: float) -> float:
    """Seconds until the image's HEALTHCHECK says healthy; fails with the container's log otherwise."""
    started = time.monotonic()
    while (status := health(container)) != "healthy":
        state = inspect(container)["State"]
        if not state["Running"] or time.monotonic() - started > timeout:
            logs = run(["docker", "logs", "--tail", "40", container], check=False)
            raise AssertionError(
                f"{container} is {status} (running: {state['Running']}, exit {state['ExitCode']}) after "
                f"{time.monotonic() - started:.0f} s:\n{logs.stdout}{logs.stderr}"
            )
        time.sleep(0.5)
    return time.monotonic() - started


def remove(*containers: str) -> None:
    if containers:
        run(["docker", "rm", "-f", "-v", *containers], check=False)


def call(method: str, url: str, timeout: float = 30, **kwargs):
    """(status, headers, parsed JSON or text) for one request; HTTP errors are answers, not exceptions."""
    response = requests.request(method, url, timeout=timeout, **kwargs)
    try:
        return response.status_code, response.headers, response.json()
    except ValueError:
        return response.status_code, response.headers, response.text


def free_ports(count: int) -> int:
    """The first of `count` consecutive free TCP ports on this machine."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                s.bind(("0.0.0.0", port))
                sockets.append(s)
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


# ---- the project's images, built once per test session -------------------------------------------------
# Test tags, never the Makefile's: the model image holds the stand-in model, and a user's own `make build`
# (with the course model) must not be replaced by it.
GATEWAY_TEST_IMAGE = "zoomcamp-10-gateway:test"
MODEL_SERVER_TEST_IMAGE = "zoomcamp-10-model-server:test"
LITERT_TEST_IMAGE = "zoomcamp-10-model-server-litert:test"


def repository_context(model_base: Path, context: Path) -> Path:
    """A copy of the repository (without environments, caches and build output) with `model_base` as
    models/clothing-model: where `make build` can run as a user runs it, without a stand-in in the real models/."""
    from contract import MODEL_BASE_PATH

    skipped = shutil.ignore_patterns(
        ".git", ".venv", ".tools", "build", "models", "__pycache__", ".*_cache", ".hypothesis"
    )
    shutil.copytree(ROOT, context, ignore=skipped, dirs_exist_ok=True)
    shutil.copytree(model_base, context / MODEL_BASE_PATH)
    return context


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """First in a fixture's arguments: no engine, no work on the others (the stand-in model's conversion)."""
    require_engine()


@pytest.fixture(scope="session")
def gateway_image(docker_engine) -> str:
    seconds = build(DOCKERFILES / "image-gateway.dockerfile", GATEWAY_TEST_IMAGE)
    note(f"gateway image: {image_size_mb(GATEWAY_TEST_IMAGE):.0f} MB, built in {seconds:.0f} s")
    return GATEWAY_TEST_IMAGE


@pytest.fixture(scope="session")
def model_context(docker_engine, model_base, tmp_path_factory) -> Path:
    """A copy of the repository with the converted stand-in as models/clothing-model (repository_context)."""
    return repository_context(model_base, tmp_path_factory.mktemp("model-context"))


@pytest.fixture(scope="session")
def model_server_image(model_context) -> str:
    """Our model-server image (TensorFlow) with the converted stand-in baked in."""
    seconds = build(DOCKERFILES / "image-model-server.dockerfile", MODEL_SERVER_TEST_IMAGE, model_context)
    note(f"model-server image: {image_size_mb(MODEL_SERVER_TEST_IMAGE):.0f} MB, built in {seconds:.0f} s")
    return MODEL_SERVER_TEST_IMAGE


def make_build(context: Path, target: str, image: str, variables: list[str], kind: str) -> float:
    """`make <target>` in `context`, as a user runs it, building `image` (a one-time build of `kind`); the seconds
    it took."""
    started = time.monotonic()
    arm64 = any(v == "PLATFORM=linux/arm64" for v in variables)
    # The builds reach the package index from the host's network, as build() does.
    variables = [*variables, "DOCKER_BUILD_FLAGS=--network host"]
    shown = " ".join(v for v in variables if "IMAGE" not in v)
    what = f"the {'arm64 ' if arm64 else ''}image {image} (make {target} {shown})"
    with one_time_build(what, kind) as budget:
        run(["make", "-C", str(context), "--no-print-directory", target, *variables], timeout=budget)
    return time.monotonic() - started


def build_litert(context: Path, image: str) -> float:
    """`make build-model MODEL_SERVER=litert` in `context` (a repository_context) on python_base(), tagged `image`."""
    variables = ["MODEL_SERVER=litert", f"PYTHON_IMAGE={python_base()}", f"MODEL_SERVER_LITERT_IMAGE={image}"]
    return make_build(context, "build-model", image, variables, "image")


@pytest.fixture(scope="session")
def litert_image(model_context) -> str:
    """Our model-server image on LiteRT (no TensorFlow), with the converted stand-in baked in, built by the
    Makefile's target."""
    seconds = build_litert(model_context, LITERT_TEST_IMAGE)
    note(f"LiteRT model-server image: {image_size_mb(LITERT_TEST_IMAGE):.0f} MB, built in {seconds:.0f} s")
    return LITERT_TEST_IMAGE


# The model trained here (notebook 00) in our model-server images, in place of the stand-in: real answers through the
# containers. Their own tags, so that the stand-in's images stay as the other tests built them.
TRAINED_MODEL_SERVER_TEST_IMAGE = "zoomcamp-10-model-server:test-trained"
TRAINED_LITERT_TEST_IMAGE = "zoomcamp-10-model-server-litert:test-trained"


@pytest.fixture(scope="session")
def trained_context(docker_engine, trained_model_base, tmp_path_factory) -> Path:
    """A copy of the repository with the trained model, as notebook 01 converts it, as models/clothing-model."""
    return repository_context(trained_model_base, tmp_path_factory.mktemp("trained-context"))


@pytest.fixture(scope="session")
def trained_model_server_image(trained_context) -> str:
    """Our model-server image (TensorFlow) with the trained model: model_server_image but for its model layer."""
    seconds = build(DOCKERFILES / "image-model-server.dockerfile", TRAINED_MODEL_SERVER_TEST_IMAGE, trained_context)
    note(f"model-server image with the trained model: built in {seconds:.0f} s")
    return TRAINED_MODEL_SERVER_TEST_IMAGE


@pytest.fixture(scope="session")
def trained_litert_image(trained_context) -> str:
    """Our model-server image on LiteRT with the trained model's model.tflite, built by the Makefile's target."""
    seconds = build_litert(trained_context, TRAINED_LITERT_TEST_IMAGE)
    note(f"LiteRT model-server image with the trained model: built in {seconds:.0f} s")
    return TRAINED_LITERT_TEST_IMAGE


# The photo of the compose and pod runs: uploaded, or fetched by the gateways from photo_server.
PHOTO = photos.jpeg(seed=4)


@pytest.fixture(scope="session")
def photo_server():
    """PHOTO over HTTP on this machine (every address), for the gateways in containers to fetch."""

    class Photo(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(PHOTO)))
            self.end_headers()
            self.wfile.write(PHOTO)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Photo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="session")
def reference(standin_keras):
    """The in-process stand-in's logits for PHOTO, preprocessed by keras-image-helper as the course does: never by
    the code under test, so that a regression in the gateway's preprocessing fails every test that compares."""
    return standin_keras(course_batch(PHOTO), training=False).numpy()[0]


@pytest.fixture(scope="session")
def trained_reference():
    """The logits of the model trained here (trained/clothing-small.h5, read by tf-keras) for PHOTO, preprocessed by
    keras-image-helper: what every tier serving that model must answer for it."""
    import training
    from conftest import TRAINED_H5

    return training.load_h5(TRAINED_H5)(course_batch(PHOTO), training=False).numpy()[0]


def course_batch(photo: bytes):
    """keras-image-helper's xception preprocessing of a photo: the course's batch of one, float32."""
    import io

    from keras_image_helper import create_preprocessor
    from PIL import Image

    from contract import IMAGE_SIZE

    return create_preprocessor("xception", target_size=IMAGE_SIZE).convert_to_tensor(Image.open(io.BytesIO(photo)))


@pytest.fixture(scope="session")
def tf_serving_base(docker_engine) -> str:
    """tensorflow/serving as the model Dockerfile names it, where it can be pulled; else one skip that says so."""
    from test_containers import MODEL_DOCKERFILE, base_images

    (image,) = set(base_images(MODEL_DOCKERFILE))
    if not pullable(image):
        unavailable(
            f"{image} cannot be pulled here: compose and the cluster run our model-server images only",
            capabilities.TF_SERVING,
        )
    return image


@pytest.fixture(scope="session")
def tf_serving_image(tf_serving_base, model_context) -> str:
    """The model image of the course's path (dockerfiles/image-model.dockerfile: TF Serving with the converted
    stand-in baked in), where tensorflow/serving can be pulled."""
    image = "zoomcamp-10-model:test"
    seconds = build(DOCKERFILES / "image-model.dockerfile", image, model_context)
    note(f"TF Serving model image: {image_size_mb(image):.0f} MB, built in {seconds:.0f} s")
    return image


def pytest_terminal_summary(terminalreporter):
    if NOTES:
        terminalreporter.section("docker")
        for line in NOTES:
            terminalreporter.write_line(line)


# ---- traffic --------------------------------------------------------------------------------------------


def host_address() -> str:
    """This machine's address on Docker's default bridge: containers on any project network reach it. A fresh
    engine may record only the bridge's subnet; its gateway is then the subnet's first address, as Docker picks it."""
    config = json.loads(run(["docker", "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"]).stdout)
    if config[0].get("Gateway"):
        return config[0]["Gateway"]
    return str(ipaddress.ip_network(config[0]["Subnet"])[1])


@dataclass
class Outcome:
    started: float  # time.monotonic() when the request was sent
    ended: float
    url: str
    status: int | None  # None: no HTTP answer at all
    error: str = ""  # the connection error, or the gateway's error code
    request_id: str = ""  # sent as X-Request-ID; the gateway logs it with every request it handles
    detail: str = ""  # the gateway's error message
    closed: bool = False  # the answer said Connection: close (a draining or stopping gateway's does)

    @property
    def refused(self) -> bool:
        """No answer because no connection was made (refused, or the container was already gone)."""
        return self.status is None and self.error.startswith("NewConnectionError")


def _root_cause(error: BaseException) -> str:
    """The innermost error of a requests failure, named: NewConnectionError (never connected) or the OSError."""
    seen = error
    while True:
        inner = getattr(seen, "reason", None) or seen.__cause__ or seen.__context__
        if inner is None or inner is seen:
            break
        seen = inner
        if type(seen).__name__ == "NewConnectionError":
            break
    return f"{type(seen).__name__}: {seen}"[:200]


def _error_of(response: requests.Response) -> tuple[str, str]:
    """The gateway's error code and message; an answer that is not the gateway's JSON says so instead."""
    try:
        error = response.json()["error"]
        return error["code"], error.get("message", "")
    except (ValueError, KeyError, TypeError):
        return "not the gateway's JSON", response.text[:200]


def access_log_statuses(logs: str) -> dict[str, str]:
    """request id -> status of every POST /predict in gunicorn access log lines (gunicorn.conf.py's format)."""
    found = re.findall(r'"POST /predict[^"]*" (\d{3}) .* rid=([0-9a-f]{32})', logs)
    return {request_id: status for status, request_id in found}


class Load:
    """Clients posting one photo each time until stopped or a bound is reached: a new connection per request, or
    with `keep_alive` one connection per client for as long as the server keeps it (as a load balancer or an
    ingress in front of the gateways would)."""

    def __init__(
        self,
        urls: list[str],
        body: bytes,
        clients: int = 8,
        max_requests: int = 5000,
        max_seconds: float = 120,
        keep_alive: bool = False,
    ):
        self.urls, self.body, self.clients = list(urls), body, clients
        self.max_requests, self.max_seconds, self.keep_alive = max_requests, max_seconds, keep_alive
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sent = 0

    def set_urls(self, urls: list[str]) -> None:
        with self._lock:
            self.urls = list(urls)

    def _next(self) -> str | None:
        with self._lock:
            if self._sent >= self.max_requests or not self.urls:
                return None
            self._sent += 1
            return self.urls[self._sent % len(self.urls)]

    def _client(self, deadline: float) -> None:
        session = requests.Session() if self.keep_alive else requests
        while not self._stop.is_set() and time.monotonic() < deadline:
            url = self._next()
            if url is None:
                return
            request_id = uuid.uuid4().hex
            headers = {"Content-Type": "image/jpeg", "X-Request-ID": request_id}
            if not self.keep_alive:
                headers["Connection"] = "close"
            started = time.monotonic()
            try:
                response = session.post(url, data=self.body, headers=headers, timeout=30)
                code, message = ("", "") if response.ok else _error_of(response)
                closed = response.headers.get("Connection", "").lower() == "close"
                outcome = Outcome(
                    started, time.monotonic(), url, response.status_code, code, request_id, message, closed
                )
            except requests.RequestException as error:
                outcome = Outcome(started, time.monotonic(), url, None, _root_cause(error), request_id)
            with self._lock:
                self.outcomes.append(outcome)

    def start(self) -> Load:
        deadline = time.monotonic() + self.max_seconds
        self._threads = [
            threading.Thread(target=self._client, args=(deadline,), daemon=True) for _ in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop_sending(self) -> None:
        """No new requests; those in flight go on."""
        self._stop.set()

    def stop_when_done(self) -> list[Outcome]:
        """Wait for the clients to end (a bound reached, or stop_sending) and their last requests to finish."""
        for thread in self._threads:
            thread.join(timeout=60)
        return self.outcomes

    def stop(self) -> list[Outcome]:
        self.stop_sending()
        return self.stop_when_done()

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)
