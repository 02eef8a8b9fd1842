"""The images and the compose file: real validators, then one truth checked against contract.py.

hadolint lints every Dockerfile; the compose files go through `docker compose config` where Compose is
installed and always through the Compose Specification schema (check-jsonschema ships it). The rest reads
the files and checks them against contract.py, gunicorn.conf.py, Pipfile(.lock) and the Makefile, so a
port, name, path or version changed in one place fails here until it changes everywhere.
The smoke test at the end builds and runs everything where a Docker engine is available.
"""

from __future__ import annotations

import ast
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

import contract
from conftest import ROOT

DOCKERFILES = ROOT / "dockerfiles"
MODEL_DOCKERFILE = DOCKERFILES / "image-model.dockerfile"
MODEL_GPU_DOCKERFILE = DOCKERFILES / "image-model-gpu.dockerfile"
GATEWAY_DOCKERFILE = DOCKERFILES / "image-gateway.dockerfile"
COMPOSE = ROOT / "docker-compose.yaml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yaml"
# What the gateway image needs at run time, per the gateway's contract.
GATEWAY_FILES = {"gateway.py", "protobuf.py", "contract.py", "safe_fetch.py", "gunicorn.conf.py"}
GATEWAY_CMD = ["gunicorn", "--config", "gunicorn.conf.py", "gateway:app"]
MODEL_DIR_IN_IMAGE = f"/{contract.MODEL_BASE_PATH}/1"
BIN = Path(sys.executable).parent


# ---- helpers ----------------------------------------------------------------------------------------


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """Each build stage's instructions as (INSTRUCTION, arguments), continuations joined, comments dropped."""
    result: list[list[tuple[str, str]]] = []
    logical = ""
    for line in dockerfile.read_text().splitlines():
        if line.strip().startswith("#") or (not logical and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        instruction, _, arguments = (logical + line).strip().partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            result.append([])
        result[-1].append((instruction.upper(), " ".join(arguments.split())))
    return result


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    return stages(dockerfile)[-1]


def args_of(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [arguments for name, arguments in stage if name == instruction]


def base_images(dockerfile: Path) -> list[str]:
    return [stage[0][1].split()[0] for stage in stages(dockerfile)]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    pairs = (item.split("=", 1) for arguments in args_of(stage, "ENV") for item in shlex.split(arguments))
    return dict(pairs)


def local_copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """COPY instructions that read the build context: (sources, destination)."""
    copies = []
    for arguments in args_of(stage, "COPY"):
        words = arguments.split()
        if any(word.startswith("--from=") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        copies.append((paths[:-1], paths[-1]))
    return copies


def exposed(dockerfile: Path) -> set[int]:
    return {
        int(port.split("/")[0])
        for arguments in args_of(final_stage(dockerfile), "EXPOSE")
        for port in arguments.split()
    }


def makefile_variables() -> dict[str, str]:
    """`NAME ?= value` and `NAME := value` lines of the Makefile, with $(OTHER) references resolved."""
    raw = dict(re.findall(r"^([A-Z_]+)\s*[?:]?=\s*(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE))
    resolve = re.compile(r"\$\(([A-Z_]+)\)")
    return {name: resolve.sub(lambda m: raw.get(m.group(1), m.group(0)), value) for name, value in raw.items()}


def compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def default_of(value: str) -> str:
    """The default of a compose interpolation like ${NAME:-default}."""
    match = re.fullmatch(r"\$\{[A-Z_]+:-([^}]*)\}", value)
    assert match, f"{value!r} is not of the form ${{NAME:-default}}"
    return match.group(1)


def locked_version(section: str, package: str) -> str:
    return json.loads((ROOT / "Pipfile.lock").read_text())[section][package]["version"].removeprefix("==")


def healthcheck_cmd(dockerfile: Path) -> list[str]:
    (healthcheck,) = args_of(final_stage(dockerfile), "HEALTHCHECK")
    return json.loads(healthcheck.split(" CMD ", 1)[1])


def compose_command() -> list[str] | None:
    """`docker compose` (plugin) or `docker-compose` (standalone), whichever works here."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and _ok([*command, "version"]):
            return command
    return None


def _ok(command: list[str], timeout: float = 20) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=timeout, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def imports_of(path: Path) -> set[str]:
    """Top-level names of every absolute import in a Python file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def existing_gateway_files() -> list[Path]:
    return [ROOT / name for name in sorted(GATEWAY_FILES) if (ROOT / name).is_file()]


# ---- real validators --------------------------------------------------------------------------------


def test_there_are_three_dockerfiles():
    assert sorted(DOCKERFILES.glob("*.dockerfile")) == sorted(
        [MODEL_DOCKERFILE, MODEL_GPU_DOCKERFILE, GATEWAY_DOCKERFILE]
    )


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES.glob("*.dockerfile")), ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([BIN / "hadolint", dockerfile], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_files_match_the_compose_specification():
    result = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE, COMPOSE_GPU],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "cpu+gpu"])
def test_docker_compose_config_accepts_the_files(files):
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed here (the schema test still runs)")
    file_args = [arg for path in files for arg in ("-f", str(path))]
    result = subprocess.run([*command, *file_args, "config", "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def _batching_parameters_class():
    """TF Serving's BatchingParameters (session_bundle_config.proto); the pip packages do not ship it."""
    file = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/batching_parameters_for_tests.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    message = file.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    wrapped = ["max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"]
    for number, name in enumerate(wrapped, start=1):
        message.field.add(name=name, number=number, type=field.TYPE_MESSAGE, type_name=".google.protobuf.Int64Value")
    message.field.add(
        name="thread_pool_name", number=5, type=field.TYPE_MESSAGE, type_name=".google.protobuf.StringValue"
    )
    message.field.add(name="allowed_batch_sizes", number=6, type=field.TYPE_INT64, label=field.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=field.TYPE_BOOL)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(file.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


def test_batching_config_parses_as_tf_serving_batching_parameters():
    parameters = text_format.Parse((DOCKERFILES / "batching.config").read_text(), _batching_parameters_class()())
    assert parameters.max_batch_size.value >= 1
    assert parameters.num_batch_threads.value >= 1
    assert parameters.batch_timeout_micros.value > 0


# ---- the model images -------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [MODEL_DOCKERFILE, MODEL_GPU_DOCKERFILE], ids=["cpu", "gpu"])
def test_model_image_serves_the_contract_model_on_the_contract_ports(dockerfile):
    stage = final_stage(dockerfile)
    assert env_of(stage)["MODEL_NAME"] == contract.MODEL_NAME
    # TF Serving's entrypoint serves ${MODEL_BASE_PATH}/${MODEL_NAME}, /models by default: the contract's layout.
    assert "MODEL_BASE_PATH" not in env_of(stage)
    assert f"/models/{contract.MODEL_NAME}/1" == MODEL_DIR_IN_IMAGE
    destinations = [arguments.split()[-1] for arguments in args_of(stage, "COPY")]
    assert MODEL_DIR_IN_IMAGE in destinations
    assert exposed(dockerfile) == {contract.GRPC_PORT, contract.REST_PORT}
    (user,) = args_of(stage, "USER")
    assert int(user.split(":")[0]) > 0, "the model server runs as a numeric non-root user"


def test_model_base_tags_match_the_locked_tensorflow():
    """The SavedModel is written by the locked TensorFlow; TF Serving of the same release reads it."""
    version = locked_version("develop", "tensorflow")
    assert set(base_images(MODEL_DOCKERFILE)) == {f"tensorflow/serving:{version}"}
    assert set(base_images(MODEL_GPU_DOCKERFILE)) == {f"tensorflow/serving:{version}-gpu"}


def test_gpu_model_dockerfile_is_the_cpu_one_on_the_gpu_tag():
    gpu = json.dumps(stages(MODEL_GPU_DOCKERFILE)).replace(f"{locked_version('develop', 'tensorflow')}-gpu", "TAG")
    cpu = json.dumps(stages(MODEL_DOCKERFILE)).replace(locked_version("develop", "tensorflow"), "TAG")
    assert gpu == cpu


def test_model_build_context_holds_only_the_model_and_batching_config():
    ignores = [
        DOCKERFILES / f"{dockerfile.name}.dockerignore" for dockerfile in (MODEL_DOCKERFILE, MODEL_GPU_DOCKERFILE)
    ]
    assert ignores[0].read_text() == ignores[1].read_text()
    rules = [line for line in ignores[0].read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*"
    assert f"!{contract.MODEL_BASE_PATH}/" in rules
    assert "!dockerfiles/batching.config" in rules
    sources = [source for copy, _ in local_copies(stages(MODEL_DOCKERFILE)[0]) for source in copy]
    assert sources == ["dockerfiles/batching.config", "model[s]"]


def test_model_image_refuses_to_build_without_a_saved_model():
    check = " ".join(args_of(stages(MODEL_DOCKERFILE)[0], "RUN"))
    assert f"/staging/{contract.MODEL_NAME}/${{MODEL_VERSION}}/saved_model.pb" in check
    assert "run \\`make model\\` first" in check and "exit 1" in check


def test_make_build_stops_without_a_saved_model(tmp_path):
    result = subprocess.run(
        ["make", "--no-print-directory", "build", f"MODEL_BASE={tmp_path}"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode != 0
    assert "run `make model` first" in result.stderr


def test_make_container_targets_stop_clearly_without_docker(tmp_path):
    if _ok(["docker", "info"], timeout=15):
        pytest.skip("a Docker engine answers here, so the guard passes")
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").touch()
    for target in ("build", "build-gpu", "compose-up", "compose-down", "compose-test"):
        result = subprocess.run(
            ["make", "--no-print-directory", target, f"MODEL_BASE={tmp_path}"], capture_output=True, text=True, cwd=ROOT
        )
        assert result.returncode != 0, target
        assert "docker: command not found" in result.stderr or "No Docker engine answers" in result.stderr, target


# ---- the gateway image ------------------------------------------------------------------------------


def test_gateway_image_copies_exactly_the_gateway_files():
    builder, runtime = stages(GATEWAY_DOCKERFILE)
    assert local_copies(builder) == [(["Pipfile", "Pipfile.lock"], "./")]
    ((sources, destination),) = local_copies(runtime)
    assert sorted(sources) == sorted(GATEWAY_FILES) and destination == "./"
    assert args_of(runtime, "WORKDIR") == ["/app"]
    # The root .dockerignore is an allow-list of exactly what the gateway build reads.
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*"
    assert {rule.removeprefix("!") for rule in rules[1:]} == GATEWAY_FILES | {"Pipfile", "Pipfile.lock"}


@pytest.mark.parametrize("name", sorted(GATEWAY_FILES))
def test_gateway_files_exist(name):
    if name == "gateway.py" and not (ROOT / name).exists():
        pytest.skip("gateway.py is not written yet")
    assert (ROOT / name).is_file()


def test_everything_the_gateway_imports_from_the_repo_is_in_the_image():
    if not (ROOT / "gateway.py").is_file():
        pytest.skip("gateway.py is not written yet")
    local = {path.stem for path in ROOT.glob("*.py")}
    needed, todo = set(), ["gateway", "gunicorn.conf"]
    while todo:
        module = todo.pop()
        needed.add(f"{module}.py")
        todo.extend(name for name in imports_of(ROOT / f"{module}.py") & local if f"{name}.py" not in needed)
    assert needed <= GATEWAY_FILES, f"the image lacks {sorted(needed - GATEWAY_FILES)}"


def test_the_gateway_imports_only_runtime_packages():
    """Third-party imports resolve to Pipfile.lock's default section, what `pipenv install --deploy` installs."""
    runtime = set(json.loads((ROOT / "Pipfile.lock").read_text())["default"])
    local = {path.stem for path in ROOT.glob("*.py")}
    distributions = packages_distributions()
    for path in existing_gateway_files():
        for name in imports_of(path) - local - set(sys.stdlib_module_names) - {"__future__"}:
            provided = {re.sub(r"[-_.]+", "-", dist).lower() for dist in distributions.get(name, [])}
            assert provided & runtime, f"{path.name} imports {name} ({provided or 'unknown'}), not a runtime package"


def test_gateway_image_runs_gunicorn_with_its_config_as_non_root(monkeypatch):
    builder, runtime = stages(GATEWAY_DOCKERFILE)
    assert json.loads(args_of(runtime, "CMD")[0]) == GATEWAY_CMD
    (user,) = args_of(runtime, "USER")
    assert int(user.split(":")[0]) > 0
    # gunicorn's default bind, the port the image exposes and the contract agree.
    monkeypatch.delenv("GATEWAY_BIND", raising=False)
    bind = runpy.run_path(str(ROOT / "gunicorn.conf.py"))["bind"]
    assert bind == f"0.0.0.0:{contract.GATEWAY_PORT}"
    assert exposed(GATEWAY_DOCKERFILE) == {contract.GATEWAY_PORT}
    assert "/healthz" in " ".join(healthcheck_cmd(GATEWAY_DOCKERFILE))
    assert healthcheck_cmd(GATEWAY_DOCKERFILE)[0] == "python"


def test_gateway_image_installs_the_lock_without_shipping_pipenv():
    builder, runtime = stages(GATEWAY_DOCKERFILE)
    assert any("pipenv install --system --deploy" in run and "--dev" not in run for run in args_of(builder, "RUN"))
    assert not any("pipenv" in arguments for _, arguments in runtime)
    assert {arguments.split()[-1] for arguments in args_of(runtime, "COPY") if "--from=builder" in arguments} == {
        "/usr/local/lib/python3.11/site-packages",
        "/usr/local/bin/gunicorn",
    }


def test_gateway_base_image_is_pinned_and_matches_the_pipfile_python():
    python = tomllib.loads((ROOT / "Pipfile").read_text())["requires"]["python_version"]
    images = set(base_images(GATEWAY_DOCKERFILE))
    assert len(images) == 1
    assert re.fullmatch(rf"python:{re.escape(python)}\.\d+-slim-[a-z]+", images.pop())
    assert re.search(r"^ARG PIPENV_VERSION=\d+\.\d+\.\d+$", GATEWAY_DOCKERFILE.read_text(), re.MULTILINE)


# ---- compose ----------------------------------------------------------------------------------------


def test_compose_wires_the_gateway_to_the_model_by_the_contract():
    services = compose()["services"]
    assert set(services) == {"clothing-model", "gateway"}
    model, gateway = services["clothing-model"], services["gateway"]
    assert model["build"]["dockerfile"] == str(MODEL_DOCKERFILE.relative_to(ROOT))
    assert gateway["build"]["dockerfile"] == str(GATEWAY_DOCKERFILE.relative_to(ROOT))
    assert gateway["environment"][contract.TF_SERVING_HOST_ENV] == f"clothing-model:{contract.GRPC_PORT}"
    assert gateway["depends_on"] == {"clothing-model": {"condition": "service_healthy"}}
    assert {int(port.rsplit(":", 1)[1]) for port in model["ports"]} == {contract.GRPC_PORT, contract.REST_PORT}
    (gateway_port,) = gateway["ports"]
    published, target = gateway_port.rsplit(":", 1)
    assert int(target) == contract.GATEWAY_PORT
    assert default_of(published) == str(contract.GATEWAY_PORT)


def test_compose_image_names_are_the_makefile_ones():
    variables = makefile_variables()
    services = compose()["services"]
    assert (
        default_of(services["clothing-model"]["image"])
        == variables["MODEL_IMAGE"]
        == "zoomcamp-10-model:xception-v4-001"
    )
    assert default_of(services["gateway"]["image"]) == variables["GATEWAY_IMAGE"] == "zoomcamp-10-gateway:001"
    gpu_model = compose(COMPOSE_GPU)["services"]["clothing-model"]
    assert default_of(gpu_model["image"]) == variables["MODEL_GPU_IMAGE"]


def test_compose_healthchecks_probe_each_tier():
    services = compose()["services"]
    model_probe = " ".join(services["clothing-model"]["healthcheck"]["test"])
    assert services["clothing-model"]["healthcheck"]["test"][:2] == ["CMD", "bash"]
    assert f"/dev/tcp/127.0.0.1/{contract.REST_PORT}" in model_probe
    assert f"GET /v1/models/{contract.MODEL_NAME} " in model_probe and "AVAILABLE" in model_probe
    # The gateway's probe is the image's own HEALTHCHECK.
    assert services["gateway"]["healthcheck"]["test"] == ["CMD", *healthcheck_cmd(GATEWAY_DOCKERFILE)]


def test_compose_batching_switch_points_at_the_baked_config():
    command = compose()["services"]["clothing-model"]["command"]
    flags = re.fullmatch(r"\$\{MODEL_BATCHING:\+(.*)\}", command).group(1).split()
    destination = next(
        arguments.split()[-1]
        for arguments in args_of(final_stage(MODEL_DOCKERFILE), "COPY")
        if "batching.config" in arguments
    )
    assert flags == ["--enable_batching", f"--batching_parameters_file={destination}"]


def test_compose_gpu_override_reserves_a_gpu_for_the_model_only():
    services = compose(COMPOSE_GPU)["services"]
    assert set(services) == {"clothing-model"}
    model = services["clothing-model"]
    assert model["build"]["dockerfile"] == str(MODEL_GPU_DOCKERFILE.relative_to(ROOT))
    (device,) = model["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


# ---- smoke: build and run where Docker is ---------------------------------------------------------


def _require_docker() -> None:
    if not shutil.which("docker"):
        pytest.skip("docker is not installed")
    if not _ok(["docker", "info"], timeout=15):
        pytest.skip("no Docker engine answers (`docker info` failed or timed out)")
    if compose_command() is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    if not (ROOT / contract.MODEL_BASE_PATH / "1" / "saved_model.pb").is_file():
        pytest.skip(f"no SavedModel in {contract.MODEL_BASE_PATH}/1: run `make model` first")
    for image in {*base_images(MODEL_DOCKERFILE), *base_images(GATEWAY_DOCKERFILE)}:
        if not _ok(["docker", "image", "inspect", image]) and not _ok(["docker", "pull", image], timeout=900):
            pytest.skip(f"the base image {image} is not available and cannot be pulled")


@pytest.mark.docker
@pytest.mark.timeout(3600)
def test_images_build_and_compose_serves_a_ready_gateway():
    _require_docker()
    make = ["make", "--no-print-directory"]
    subprocess.run([*make, "build"], cwd=ROOT, check=True, timeout=2400)
    try:
        subprocess.run([*make, "compose-up"], cwd=ROOT, check=True, timeout=600, env={**os.environ, "COMPOSE_GPU": ""})
        with urllib.request.urlopen(f"http://127.0.0.1:{contract.GATEWAY_PORT}/readyz", timeout=10) as response:
            assert response.status == 200
    finally:
        subprocess.run([*make, "compose-down"], cwd=ROOT, check=False, timeout=300)
