"""The images and the compose file: real validators, then one truth checked against contract.py.

hadolint lints every Dockerfile; the compose files go through `docker compose config` where Compose is
installed and always through the Compose Specification schema (check-jsonschema ships it). The rest reads
the files and checks them against contract.py, gunicorn.conf.py, Pipfile(.lock) and the Makefile, so a
port, name, path or version changed in one place fails here until it changes everywhere.
The images themselves are built and run on a real engine by test_images.py, test_litert_image.py,
test_compose_stack.py, and on the cluster by test_cluster.py and test_arm64.py.
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
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

import capabilities
import contract
from conftest import ROOT
from engine import succeeds

DOCKERFILES = ROOT / "dockerfiles"
MODEL_DOCKERFILE = DOCKERFILES / "image-model.dockerfile"
MODEL_GPU_DOCKERFILE = DOCKERFILES / "image-model-gpu.dockerfile"
GATEWAY_DOCKERFILE = DOCKERFILES / "image-gateway.dockerfile"
MODEL_SERVER_DOCKERFILE = DOCKERFILES / "image-model-server.dockerfile"
MODEL_SERVER_LITERT_DOCKERFILE = DOCKERFILES / "image-model-server-litert.dockerfile"
# The images on a Python base: the gateway and our model server, on TensorFlow and on LiteRT.
PYTHON_DOCKERFILES = [GATEWAY_DOCKERFILE, MODEL_SERVER_DOCKERFILE, MODEL_SERVER_LITERT_DOCKERFILE]
COMPOSE = ROOT / "docker-compose.yaml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yaml"
COMPOSE_MODEL_SERVER = ROOT / "docker-compose.model-server.yaml"
# What a model-server image needs at run time: the command line, the contract, the messages and the serving package
# with its own runtime only (model_server.py imports the chosen one alone).
RUNTIME_MODULES = {"tensorflow": "serving/runtime_tensorflow.py", "litert": "serving/runtime_litert.py"}
_SERVER_FILES = {"model_server.py", "contract.py", "protobuf.py"} | {
    f"serving/{p.name}" for p in (ROOT / "serving").glob("*.py")
}
MODEL_SERVER_FILES = _SERVER_FILES - {RUNTIME_MODULES["litert"]}
MODEL_SERVER_LITERT_FILES = _SERVER_FILES - {RUNTIME_MODULES["tensorflow"]}
# Each model-server image: its Dockerfile, its Pipfile section, the files it holds, the model file it serves, and
# the runtime module it leaves out.
MODEL_SERVERS = {
    "tensorflow": (MODEL_SERVER_DOCKERFILE, "model-server", MODEL_SERVER_FILES, "saved_model.pb", "litert"),
    "litert": (
        MODEL_SERVER_LITERT_DOCKERFILE,
        "model-server-litert",
        MODEL_SERVER_LITERT_FILES,
        "model.tflite",
        "tensorflow",
    ),
}
# What the gateway image needs at run time: the generated app, its parts and the modules they share with the rest.
GATEWAY_FILES = {"gateway.py", "protobuf.py", "contract.py", "safe_fetch.py", "gunicorn.conf.py", "gateway.html"} | {
    f"gateway_parts/{p.name}" for p in (ROOT / "gateway_parts").glob("*") if p.suffix in (".py", ".json")
}
GATEWAY_CMD = ["gunicorn", "--config", "gunicorn.conf.py", "gateway:app"]
MODEL_DIR_IN_IMAGE = f"/{contract.MODEL_BASE_PATH}/1"
BIN = Path(sys.executable).parent


# ---- helpers ----------------------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """Every instruction as (INSTRUCTION, arguments), continuations joined, comments dropped."""
    result: list[tuple[str, str]] = []
    logical = ""
    for line in dockerfile.read_text().splitlines():
        if line.strip().startswith("#") or (not logical and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        instruction, _, arguments = (logical + line).strip().partition(" ")
        logical = ""
        result.append((instruction.upper(), " ".join(arguments.split())))
    return result


def global_args(dockerfile: Path) -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults: what FROM lines may use."""
    defaults = {}
    for instruction, arguments in instructions(dockerfile):
        if instruction == "FROM":
            break
        if instruction == "ARG":
            name, _, default = arguments.partition("=")
            defaults[name] = default
    return defaults


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """Each build stage's instructions as (INSTRUCTION, arguments), from its FROM on."""
    result: list[list[tuple[str, str]]] = []
    for instruction, arguments in instructions(dockerfile):
        if instruction == "FROM":
            result.append([])
        if result:
            result[-1].append((instruction, arguments))
    return result


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    return stages(dockerfile)[-1]


def args_of(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [arguments for name, arguments in stage if name == instruction]


def base_images(dockerfile: Path) -> list[str]:
    """Each stage's base, with ${ARG} references resolved to the ARG defaults."""
    defaults = global_args(dockerfile)
    resolve = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
    return [resolve.sub(lambda m: defaults[m.group(1)], stage[0][1].split()[0]) for stage in stages(dockerfile)]


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


RESET = "!reset"  # Compose's tag for "drop the value an earlier file set"


class _ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it, with `!reset` loaded as RESET."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def compose(path: Path = COMPOSE) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # noqa: S506 - a SafeLoader with one extra tag


def _without_resets(value):
    """The file as the schema sees it once merged: a reset key is simply absent."""
    if isinstance(value, dict):
        return {key: _without_resets(item) for key, item in value.items() if item != RESET}
    if isinstance(value, list):
        return [_without_resets(item) for item in value]
    return value


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
        if shutil.which(command[0]) and succeeds([*command, "version"]):
            return command
    return None


def runtime_dependencies(
    section: str, entry: str, files: set[str], left_out: frozenset = frozenset()
) -> tuple[set[str], set[str]]:
    """The repo files the module `entry` needs, transitively (a package's modules with their __init__.py), as paths
    relative to the repository, without the files `left_out` (an image's other runtime, which it never imports), and
    the third-party imports among those in `files`."""
    needed, todo = set(), [f"{entry}.py"]
    while todo:
        path = todo.pop()
        needed.add(path)
        todo.extend(local for local in repo_files_imported(ROOT / path) if local not in needed | left_out)
    third_party, known = set(), local_names() | set(sys.stdlib_module_names) | {"__future__"}
    for path in needed & files:
        third_party |= imports_of(ROOT / path) - known
    return needed, third_party


def excluded_files(dockerfile: Path) -> set[str]:
    """The files its .dockerignore names one by one to leave out of a folder it lets in (no wildcards)."""
    ignore = DOCKERFILES / f"{dockerfile.name}.dockerignore"
    lines = [line.strip() for line in ignore.read_text().splitlines()] if ignore.is_file() else []
    return {line for line in lines if line and line[0] not in "#!" and "*" not in line}


def copied_files(stage, dockerfile: Path | None = None) -> set[str]:
    """The repository files a stage's COPY instructions put under its WORKDIR, each at its own path: the modules
    beside each other, a package (a source ending in /) as a folder of its .py and .json files, less what the
    Dockerfile's .dockerignore leaves out of it."""
    copied = set()
    for sources, destination in local_copies(stage):
        for source in sources:
            if source.endswith("/"):
                assert destination == f"./{source}", f"{source} must keep its folder in the image"
                copied |= {f"{source}{p.name}" for p in (ROOT / source).glob("*") if p.suffix in (".py", ".json")}
            else:
                assert destination == "./"
                copied.add(source)
    return copied - (excluded_files(dockerfile) if dockerfile else set())


def local_names() -> set[str]:
    """Top-level names the repository provides: its modules and its packages."""
    return {path.stem for path in ROOT.glob("*.py")} | {path.parent.name for path in ROOT.glob("*/__init__.py")}


def repo_files_imported(path: Path) -> set[str]:
    """The repo files an import in `path` loads: `contract.py`; for `serving.versions`, serving/__init__.py and
    serving/versions.py."""
    files = set()
    for module in imported_modules(path):
        parts = module.split(".")
        if (ROOT / f"{parts[0]}.py").is_file():
            files.add(f"{parts[0]}.py")
        elif (ROOT / parts[0] / "__init__.py").is_file():
            files.add(f"{parts[0]}/__init__.py")
            if len(parts) > 1:
                files.add("/".join(parts[:2]) + ".py")
    return files


def imported_modules(path: Path) -> set[str]:
    """The full dotted name of every absolute import in a Python file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def imports_of(path: Path) -> set[str]:
    """Top-level names of every absolute import in a Python file."""
    return {name.split(".")[0] for name in imported_modules(path)}


def existing_gateway_files() -> list[Path]:
    """The gateway image's Python files (it also carries gateway.html, the page)."""
    return [ROOT / name for name in sorted(GATEWAY_FILES) if name.endswith(".py") and (ROOT / name).is_file()]


# ---- real validators --------------------------------------------------------------------------------


def test_there_are_five_dockerfiles():
    assert sorted(DOCKERFILES.glob("*.dockerfile")) == sorted(
        [
            MODEL_DOCKERFILE,
            MODEL_GPU_DOCKERFILE,
            MODEL_SERVER_DOCKERFILE,
            MODEL_SERVER_LITERT_DOCKERFILE,
            GATEWAY_DOCKERFILE,
        ]
    )


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES.glob("*.dockerfile")), ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([BIN / "hadolint", dockerfile], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU, COMPOSE_MODEL_SERVER], ids=lambda p: p.name)
def test_compose_files_match_the_compose_specification(path):
    """The Compose Specification's JSON schema, as check-jsonschema vendors it (offline)."""
    import check_jsonschema
    import jsonschema

    schema = json.loads(
        (Path(check_jsonschema.__file__).parent / "builtin_schemas/vendor/compose-spec.json").read_text()
    )
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(_without_resets(compose(path))), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "files",
    [[COMPOSE], [COMPOSE, COMPOSE_GPU], [COMPOSE, COMPOSE_MODEL_SERVER]],
    ids=["cpu", "cpu+gpu", "model-server"],
)
def test_docker_compose_config_accepts_the_files(files):
    command = compose_command()
    if command is None:
        capabilities.unavailable(
            "neither `docker compose` nor `docker-compose` is installed here (the schema test still runs)",
            capabilities.DOCKER,
        )
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
    # TF Serving's entrypoint serves ${MODEL_BASE_PATH}/${MODEL_NAME}, and its image sets MODEL_BASE_PATH=/models:
    # the model must land in /models/<name>/<version>, with the base path left as the image sets it.
    assert "MODEL_BASE_PATH" not in env_of(stage)
    destinations = [arguments.split()[-1] for arguments in args_of(stage, "COPY")]
    assert f"/models/{contract.MODEL_NAME}/1" in destinations
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


@pytest.mark.parametrize("runtime", MODEL_SERVERS)
def test_model_server_image_has_tf_servings_contract(runtime):
    """The same contract as tensorflow/serving: MODEL_NAME, MODEL_BASE_PATH, /models/<name>/1, ports, non-root."""
    dockerfile, _, files, model_file, _ = MODEL_SERVERS[runtime]
    stage = final_stage(dockerfile)
    environment = env_of(stage)
    assert environment["MODEL_NAME"] == contract.MODEL_NAME
    assert environment["MODEL_BASE_PATH"] == "/models"
    assert environment.get("MODEL_RUNTIME", "tensorflow") == runtime
    assert f"{environment['MODEL_BASE_PATH']}/{environment['MODEL_NAME']}/1" == MODEL_DIR_IN_IMAGE
    destinations = [arguments.split()[-1] for arguments in args_of(stage, "COPY")]
    assert MODEL_DIR_IN_IMAGE in destinations or f"{MODEL_DIR_IN_IMAGE}/{model_file}" in destinations
    # The batching switch of compose and the manifests points at the same path in both images.
    tf_serving_batching = [a.split()[-1] for a in args_of(final_stage(MODEL_DOCKERFILE), "COPY") if "batching" in a]
    assert tf_serving_batching == [a.split()[-1] for a in args_of(stage, "COPY") if "batching" in a]
    assert exposed(dockerfile) == {contract.GRPC_PORT, contract.REST_PORT}
    (user,) = args_of(stage, "USER")
    assert user == args_of(final_stage(MODEL_DOCKERFILE), "USER")[0], "the same uid as the TF Serving image"
    # Arguments after the image name reach the server, as tensorflow/serving's entrypoint passes them on.
    (entrypoint,) = args_of(stage, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["python", "/app/model_server.py"]
    assert not args_of(stage, "CMD")
    probe = " ".join(healthcheck_cmd(dockerfile))
    assert f"127.0.0.1:{contract.REST_PORT}/v1/models/" in probe and "AVAILABLE" in probe
    assert copied_files(stage, dockerfile) == files
    assert args_of(stage, "WORKDIR") == ["/app"]


@pytest.mark.parametrize("runtime", MODEL_SERVERS)
def test_model_server_image_installs_its_own_lock_section(runtime):
    dockerfile, section, _, _, _ = MODEL_SERVERS[runtime]
    builder = stages(dockerfile)[0]
    (install,) = [run for run in args_of(builder, "RUN") if "pipenv requirements" in run]
    assert "pipenv verify" in install and f"--categories {section} " in install and "--require-hashes" in install
    assert not any("pipenv" in arguments for _, arguments in final_stage(dockerfile))
    lock = json.loads((ROOT / "Pipfile.lock").read_text())
    runtime_package = {"tensorflow": {"tensorflow", "tensorflow-serving-api"}, "litert": {"ai-edge-litert"}}[runtime]
    assert runtime_package | {"grpcio-health-checking", "werkzeug"} <= set(lock[section])


def test_the_litert_image_installs_no_tensorflow():
    """LiteRT's section resolves without TensorFlow, Keras or TF Serving's APIs: the image cannot hold them."""
    section = json.loads((ROOT / "Pipfile.lock").read_text())["model-server-litert"]
    assert not {name for name in section if name.startswith(("tensorflow", "keras", "tf-keras", "tf_keras"))}


@pytest.mark.parametrize("runtime", MODEL_SERVERS)
def test_model_server_imports_only_its_lock_section(runtime):
    _, section_name, files, _, other = MODEL_SERVERS[runtime]
    left_out = frozenset({RUNTIME_MODULES[other]})
    needed, third_party = runtime_dependencies(section_name, "model_server", files, left_out)
    assert needed == files, f"the image lacks {sorted(needed - files)}"
    section = set(json.loads((ROOT / "Pipfile.lock").read_text())[section_name])
    distributions = packages_distributions()
    for name in third_party:
        provided = {re.sub(r"[-_.]+", "-", dist).lower() for dist in distributions.get(name, [])}
        assert provided & section, f"model_server.py imports {name} ({provided or 'unknown'}), not in [{section_name}]"


@pytest.mark.parametrize("section_name", ["model-server", "model-server-litert"])
def test_model_server_section_pins_the_development_versions(section_name):
    """The tests run model_server.py in the development environment: with the versions its image installs."""
    lock = json.loads((ROOT / "Pipfile.lock").read_text())
    differ = {
        name: (spec["version"], lock["develop"].get(name, {}).get("version"))
        for name, spec in lock[section_name].items()
        if spec["version"] != lock["develop"].get(name, {}).get("version")
    }
    assert not differ


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


@pytest.mark.parametrize("runtime", MODEL_SERVERS)
def test_model_server_build_context_holds_only_what_the_image_copies(runtime):
    dockerfile, _, _, model_file, other = MODEL_SERVERS[runtime]
    rules = [
        line
        for line in (DOCKERFILES / f"{dockerfile.name}.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "*"
    allowed = {rule.removeprefix("!").rstrip("/") for rule in rules[1:] if rule.startswith("!")}
    copied = {source for copy, _ in local_copies(stages(dockerfile)[0]) for source in copy}
    copied |= {source.rstrip("/") for copy, _ in local_copies(final_stage(dockerfile)) for source in copy}
    models = {rule for rule in allowed if rule.startswith(contract.MODEL_BASE_PATH)}
    assert allowed - models == copied - {"model[s]"}
    # The model's versions, with only what this runtime reads where the context can leave the rest out.
    assert models in ({contract.MODEL_BASE_PATH}, {f"{contract.MODEL_BASE_PATH}/*/{model_file}"})
    assert RUNTIME_MODULES[other] in rules, "the other runtime stays out of the image"
    assert "**/__pycache__" in rules, "bytecode caches of the package stay out of the image"


@pytest.mark.parametrize("runtime", MODEL_SERVERS)
def test_model_server_image_refuses_to_build_without_its_model_file(runtime):
    dockerfile, _, _, model_file, _ = MODEL_SERVERS[runtime]
    check = " ".join(args_of(stages(dockerfile)[0], "RUN"))
    assert f"/staging/{contract.MODEL_NAME}/${{MODEL_VERSION}}/{model_file}" in check
    assert "run \\`make model\\` first" in check and "exit 1" in check


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


def test_make_build_builds_the_chosen_model_server_on_the_chosen_base():
    """`make -n build`: the docker commands make would run, for each MODEL_SERVER, PYTHON_IMAGE and extra flags."""

    def builds(*variables: str) -> list[str]:
        result = subprocess.run(["make", "-n", "build", *variables], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.replace("\\\n", " ").splitlines()
        return [" ".join(line.split()) for line in lines if line.startswith("docker build")]

    variables = makefile_variables()
    model, gateway = builds()
    assert "-f dockerfiles/image-model.dockerfile" in model and f"-t {variables['MODEL_IMAGE']}" in model
    assert "-f dockerfiles/image-gateway.dockerfile" in gateway and "PYTHON_IMAGE" not in gateway
    local = builds("MODEL_SERVER=local", "PYTHON_IMAGE=base:1", "DOCKER_BUILD_FLAGS=--pull")
    assert "-f dockerfiles/image-model-server.dockerfile" in local[0]
    assert f"-t {variables['MODEL_SERVER_IMAGE']}" in local[0]
    assert all("--build-arg PYTHON_IMAGE=base:1" in line and "--pull" in line for line in local)
    litert = builds("MODEL_SERVER=litert", "PLATFORM=linux/arm64")
    assert "-f dockerfiles/image-model-server-litert.dockerfile" in litert[0] and "--platform linux/arm64" in litert[0]
    assert f"-t {variables['MODEL_SERVER_LITERT_IMAGE']}" in litert[0]
    wrong = subprocess.run(["make", "-n", "build", "MODEL_SERVER=tfs"], capture_output=True, text=True, cwd=ROOT)
    assert wrong.returncode != 0 and "use tf-serving (the default), local or litert" in wrong.stderr
    arm64 = builds("MODEL_SERVER=local", "PLATFORM=linux/arm64")
    assert len(arm64) == 2 and all(line.startswith("docker build --platform linux/arm64 ") for line in arm64)
    # tensorflow/serving has no arm64 image: make says so instead of failing on a pull.
    tf_serving = subprocess.run(["make", "build", "PLATFORM=linux/arm64"], capture_output=True, text=True, cwd=ROOT)
    assert tf_serving.returncode != 0 and "publishes amd64 images only" in tf_serving.stderr


def test_make_container_targets_stop_clearly_without_docker(tmp_path):
    """An engine that does not answer (here: a socket that is not there, whether or not this machine has one)."""
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").touch()
    no_engine = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    for target in ("build", "build-model", "build-gateway", "build-gpu", "compose-up", "compose-down", "compose-test"):
        result = subprocess.run(
            ["make", "--no-print-directory", target, f"MODEL_BASE={tmp_path}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=no_engine,
        )
        assert result.returncode != 0, target
        assert "docker: command not found" in result.stderr or "No Docker engine answers" in result.stderr, target


# ---- the gateway image ------------------------------------------------------------------------------


def test_gateway_image_copies_exactly_the_gateway_files():
    builder, runtime = stages(GATEWAY_DOCKERFILE)
    assert local_copies(builder) == [(["Pipfile", "Pipfile.lock"], "./")]
    assert copied_files(runtime) == GATEWAY_FILES
    assert args_of(runtime, "WORKDIR") == ["/app"]
    # The root .dockerignore is an allow-list of exactly what the gateway build reads, caches left out.
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*" and rules[-1] == "**/__pycache__"
    sources = {source for sources, _ in local_copies(runtime) for source in sources}
    assert {rule.removeprefix("!") for rule in rules[1:-1]} == sources | {"Pipfile", "Pipfile.lock"}


@pytest.mark.parametrize("name", sorted(GATEWAY_FILES))
def test_gateway_files_exist(name):
    assert (ROOT / name).is_file()


def test_everything_the_gateway_imports_from_the_repo_is_in_the_image():
    needed = runtime_dependencies("default", "gateway", GATEWAY_FILES)[0] | {"gunicorn.conf.py"}
    needed |= runtime_dependencies("default", "gunicorn.conf", GATEWAY_FILES)[0]
    assert needed <= GATEWAY_FILES, f"the image lacks {sorted(needed - GATEWAY_FILES)}"


def test_the_gateway_imports_only_runtime_packages():
    """Third-party imports resolve to Pipfile.lock's default section, what the gateway image installs."""
    runtime = set(json.loads((ROOT / "Pipfile.lock").read_text())["default"])
    local = local_names()
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


def test_gateway_image_installs_the_lock_into_a_venv_without_shipping_pipenv():
    """The runtime is a venv the runtime stage copies whole: no path one distribution's Python chose."""
    builder, runtime = stages(GATEWAY_DOCKERFILE)
    (install,) = [run for run in args_of(builder, "RUN") if "pipenv requirements" in run]
    assert "pipenv verify" in install and "--require-hashes" in install and "--categories" not in install
    assert "venv --without-pip /opt/venv" in install and "--dev" not in install
    assert not any("pipenv" in arguments for _, arguments in runtime)
    copied = [arguments.split() for arguments in args_of(runtime, "COPY") if "--from=builder" in arguments]
    assert copied == [["--from=builder", "/opt/venv", "/opt/venv"]]
    assert env_of(runtime)["PATH"].startswith("/opt/venv/bin:")
    assert "site-packages" not in GATEWAY_DOCKERFILE.read_text()


@pytest.mark.parametrize("dockerfile", PYTHON_DOCKERFILES, ids=lambda p: p.name)
def test_python_base_is_a_build_argument_pinned_to_the_pipfile_python(dockerfile):
    python = tomllib.loads((ROOT / "Pipfile").read_text())["requires"]["python_version"]
    default = global_args(dockerfile)["PYTHON_IMAGE"]
    assert re.fullmatch(rf"python:{re.escape(python)}\.\d+-slim-[a-z]+", default)
    assert {stage[0][1].split()[0] for stage in stages(dockerfile)} == {"${PYTHON_IMAGE}"}
    assert re.search(r"^ARG PIPENV_VERSION=\d+\.\d+\.\d+$", dockerfile.read_text(), re.MULTILINE)
    # Debian's Python has no `python` command outside a venv: the builder says python3.
    builder = stages(dockerfile)[0]
    assert all(not re.search(r"(^|\s)python\s", run) for run in args_of(builder, "RUN"))


def test_python_images_share_one_base_and_pipenv():
    assert len({global_args(dockerfile)["PYTHON_IMAGE"] for dockerfile in PYTHON_DOCKERFILES}) == 1
    versions = {
        re.search(r"^ARG PIPENV_VERSION=(\S+)$", d.read_text(), re.MULTILINE).group(1) for d in PYTHON_DOCKERFILES
    }
    assert len(versions) == 1


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


def test_compose_model_server_override_swaps_only_the_model_image():
    services = compose(COMPOSE_MODEL_SERVER)["services"]
    assert set(services) == {"clothing-model"}
    model = services["clothing-model"]
    assert default_of(model["image"]) == makefile_variables()["MODEL_SERVER_IMAGE"]
    assert model["build"]["dockerfile"] == str(MODEL_SERVER_DOCKERFILE.relative_to(ROOT))
    # The base file pins linux/amd64 for tensorflow/serving; our image is built for the host's own platform.
    assert model["platform"] == RESET
    # The probe is the image's own HEALTHCHECK.
    assert model["healthcheck"]["test"] == ["CMD", *healthcheck_cmd(MODEL_SERVER_DOCKERFILE)]


def test_compose_gpu_override_reserves_a_gpu_for_the_model_only():
    services = compose(COMPOSE_GPU)["services"]
    assert set(services) == {"clothing-model"}
    model = services["clothing-model"]
    assert model["build"]["dockerfile"] == str(MODEL_GPU_DOCKERFILE.relative_to(ROOT))
    (device,) = model["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
