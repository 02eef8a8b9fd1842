"""docker compose for real: the two tiers up and healthy, the course's request, 5 gateways : 1 model, and the
gateways stopped under load with no accepted request lost.

The stack is the project's compose files with our model-server image (docker-compose.model-server.yaml), the
images built from the project's Dockerfiles, under a project name and host ports of the test's own. The course's
request fetches its photo from a server on this machine, which the gateway is told to allow.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import pytest

import contract
import real_answers
from conftest import ROOT, execute_notebook, tagged_result
from engine import (
    PHOTO,
    Load,
    access_log_statuses,
    address,
    call,
    free_ports,
    host_address,
    note,
    python_base,
    repository_context,
    run,
    unique,
)
from servers import free_port

pytestmark = pytest.mark.docker

# Our model server; tensorflow/serving is the base file alone (the last test runs it where it can be pulled).
COMPOSE_FILES = ["docker-compose.yaml", "docker-compose.model-server.yaml"]
SCALE = 5


@dataclass
class Stack:
    command: list[str]
    env: dict[str, str]
    photo_url: str

    def compose(self, *args: str, timeout: float = 600):
        return run([*self.command, *args], timeout=timeout, env=self.env, cwd=ROOT)

    def gateway_addresses(self) -> list[str]:
        """Each gateway container's own address on the project network (no docker-proxy in between)."""
        return [
            f"http://{address(c)}:{contract.GATEWAY_PORT}" for c in self.compose("ps", "-q", "gateway").stdout.split()
        ]

    def gateway_urls(self) -> list[str]:
        count = len(self.compose("ps", "-q", "gateway").stdout.split())
        ports = [self.compose("port", "--index", str(i), "gateway", str(contract.GATEWAY_PORT)).stdout for i in
                 range(1, count + 1)]  # fmt: skip
        return [f"http://127.0.0.1:{port.strip().rsplit(':', 1)[1]}" for port in ports]


@contextlib.contextmanager
def compose_stack(files: list[str], images: dict[str, str], photo_port: int):
    """`docker compose up --wait` of `files` under a project name and host ports of its own; down afterwards."""
    host = host_address()
    first = free_ports(SCALE)
    env = {
        **os.environ,
        **images,
        "GATEWAY_PORTS": f"{first}-{first + SCALE - 1}",
        "MODEL_PORTS_GRPC": str(free_port()),
        "MODEL_PORTS_REST": str(free_port()),
        "FETCH_ALLOW_HOSTS": host,
    }
    command = ["docker", "compose", "-p", unique("zoomcamp-10-test"), *(f for name in files for f in ("-f", name))]
    stack = Stack(command, env, f"http://{host}:{photo_port}/pants.jpg")
    started = time.monotonic()
    try:
        stack.compose("up", "-d", "--wait", "--wait-timeout", "300")
        note(f"compose up --wait ({', '.join(files)}, one gateway): healthy after {time.monotonic() - started:.0f} s")
        yield stack
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", timeout=300)


@pytest.fixture(scope="module")
def stack(gateway_image, trained_model_server_image, photo_server):
    """The compose files with our model-server image holding the model trained here (notebook 00)."""
    images = {"MODEL_SERVER_IMAGE": trained_model_server_image, "GATEWAY_IMAGE": gateway_image}
    with compose_stack(COMPOSE_FILES, images, photo_server) as running:
        yield running


def check_course_request(stack: Stack, reference: np.ndarray) -> None:
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300")  # as compose-up leaves it, whatever ran before
    (url,) = stack.gateway_urls()
    status, _, answer = call("POST", f"{url}/predict", json={"url": stack.photo_url})
    assert status == 200, answer
    assert list(answer) == list(contract.CLASSES)
    served = np.array([answer[name] for name in contract.CLASSES], dtype=np.float32)
    assert np.abs(served - reference).max() <= 1e-4
    status, _, ready = call("GET", f"{url}/readyz")
    assert status == 200 and ready["status"] == "ready"


def check_five_gateways_share_one_model(stack: Stack, reference: np.ndarray) -> None:
    started = time.monotonic()
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "--scale", f"gateway={SCALE}")
    urls = stack.gateway_urls()
    print(f"scaled to {SCALE} gateways in {time.monotonic() - started:.0f} s: {urls}")
    assert len(set(urls)) == SCALE
    for url in urls:
        status, _, answer = call("POST", f"{url}/predict", data=PHOTO, headers={"Content-Type": "image/jpeg"})
        assert status == 200, (url, answer)
        served = np.array([answer[name] for name in contract.CLASSES], dtype=np.float32)
        assert np.abs(served - reference).max() <= 1e-4


def check_stopping_the_gateways_under_load(stack: Stack) -> None:
    """SIGTERM to every gateway while 8 clients post photos. Every request a gateway accepted, that is, every one
    in its access log, and every one sent before the stop, is answered 200. The rest found no listener: the
    connection was refused, or reset while waiting in the kernel's queue, before the gateway read a byte.

    The clients go to the containers' own addresses: through a published port, docker-proxy accepts every
    connection itself and closes it when the container refuses, which would hide the gateway's behaviour."""
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "--scale", f"gateway={SCALE}")
    urls = stack.gateway_addresses()
    assert len(urls) == SCALE
    load = Load([f"{url}/predict" for url in urls], PHOTO, clients=8, max_requests=3000, max_seconds=90).start()
    while load.count() < 40:
        time.sleep(0.05)
    stop_sent = time.monotonic()
    stack.compose("stop", "--timeout", "30", "gateway")
    stopped = time.monotonic()
    after = load.count() + 8  # a few requests more, to gateways that are gone
    while load.count() < after and time.monotonic() < stopped + 10:
        time.sleep(0.05)
    outcomes = load.stop()
    handled = access_log_statuses(stack.compose("logs", "--no-log-prefix", "gateway").stdout)
    before = [o for o in outcomes if o.started < stop_sent]
    in_flight = [o for o in before if o.ended > stop_sent]
    accepted = [o for o in outcomes if o.request_id in handled]
    not_accepted = [o for o in outcomes if o.request_id not in handled]
    print(
        f"{len(outcomes)} requests: {len(before)} sent before the stop ({len(in_flight)} in flight when it began); "
        f"{len(accepted)} accepted, {sum(o.refused for o in not_accepted)} refused, "
        f"{sum(not o.refused for o in not_accepted)} reset unread; the stop took {stopped - stop_sent:.1f} s"
    )
    assert in_flight, "the stop should find requests in flight"
    assert all(o.status == 200 for o in before), [o for o in before if o.status != 200][:5]
    assert all(o.status == 200 and handled[o.request_id] == "200" for o in accepted), [
        o for o in accepted if o.status != 200
    ][:5]
    assert all(o.status is None for o in not_accepted), [o for o in not_accepted if o.status is not None][:5]
    states = stack.compose("ps", "--all", "--format", "{{.Service}} {{.State}} {{.ExitCode}}", "gateway").stdout
    assert len(states.split()) == 3 * SCALE, states
    for line in states.splitlines():
        assert line.split()[1:] == ["exited", "0"], f"a gateway did not exit cleanly: {line}"


def test_notebook_05_takes_the_courses_docker_steps(
    gateway_image, model_server_image, model_base, photo_server, reference, tmp_path_factory
):
    """Notebook 05 top to bottom, as a learner runs it after `make model`: here with our model server (no
    registry), the images the suite built, and ports of its own. The course's client gets the in-process model's
    logits from the model's container; the gateway's container and compose's gateways, five of them at the end,
    give the same; and nothing it started is left."""
    context = repository_context(model_base, tmp_path_factory.mktemp("notebook-05"))
    (context / "photo.jpg").write_bytes(PHOTO)
    grpc_port, rest_port, first = free_port(), free_port(), free_ports(5)
    project = unique("zoomcamp-10-nb05")
    started = time.monotonic()
    executed = tmp_path_factory.mktemp("executed") / "05.ipynb"
    shown, _ = execute_notebook(
        context / "notebooks" / "05-docker-and-compose.ipynb",
        executed,
        context,
        model_server_image=model_server_image,
        gateway_image=gateway_image,
        python_image=python_base(),
        docker_build_flags="--network host",
        grpc_port=grpc_port,
        rest_port=rest_port,
        gateway_port=first,
        photo="photo.jpg",
        photo_url=f"http://{host_address()}:{photo_server}/pants.jpg",
        fetch_allow_hosts=host_address(),
        project=project,
    )
    note(f"notebook 05 ran in {time.monotonic() - started:.0f} s")
    assert (
        "tensorflow/serving: cannot be pulled here" in shown and f"The model tier here: {model_server_image}" in shown
    )
    section_2 = tagged_result(executed)
    assert list(section_2) == list(contract.CLASSES)
    assert np.abs(np.array(list(section_2.values())) - reference).max() <= 1e-3  # rounded to 3 decimals
    differences = [float(d) for d in re.findall(r"largest difference from section 2: (\S+)", shown)]
    assert len(differences) == 1 and differences[0] <= 1e-4
    top = contract.CLASSES[int(np.argmax(reference))]
    assert re.findall(r"gateway on port (\d+): (\S+)", shown) == [(str(first + i), top) for i in range(5)]
    left = run(["docker", "ps", "-aq", "--filter", f"name={project}"]).stdout.split()
    left += run(["docker", "network", "ls", "-q", "--filter", f"name={project}"]).stdout.split()
    assert not left, f"notebook 05 left {left}"


def test_the_trained_model_answers_every_test_photo_as_in_process(dataset, stack):
    """The model trained here behind the composed gateway: on each of the 372 test photos the top class of the
    model in process, and the accuracy notebook 00 reported."""
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300")  # as compose-up leaves it, whatever ran before
    (url,) = stack.gateway_urls()
    report = real_answers.check_gateway(url, dataset)
    note(
        f"compose with the trained model: {report.correct} of {report.photos} test photos right "
        f"({report.accuracy:.1%}), logits within {report.largest_logit_difference:.2g} of the model in process"
    )
    assert report.photos == 372 and report.largest_logit_difference <= 1e-5 * report.largest_logit


def test_stopping_the_gateways_under_load_loses_no_accepted_request(stack):
    check_stopping_the_gateways_under_load(stack)


def test_the_same_stack_with_tensorflow_serving(tf_serving_image, gateway_image, photo_server, reference):
    """Where tensorflow/serving can be pulled: docker-compose.yaml as it is, the course's model image in it."""
    images = {"MODEL_IMAGE": tf_serving_image, "GATEWAY_IMAGE": gateway_image}
    with compose_stack(["docker-compose.yaml"], images, photo_server) as stack:
        check_course_request(stack, reference)
        check_five_gateways_share_one_model(stack, reference)
        check_stopping_the_gateways_under_load(stack)
