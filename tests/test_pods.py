"""The Kubernetes pods on Docker, run as the kubelet runs them (tests/kubelet.py), from the rendered overlay.

A real control plane runs the manifests in tests/test_cluster.py. This imitation of the kubelet stays for what
that cluster does not run here: the arm64 images under qemu (tests/test_arm64.py starts their pods with these
helpers), and k8s/overlays/kind with tensorflow/serving where that image can be pulled (the test below). Two model
replicas share the headless Service's name as a network alias, so Docker's DNS answers it with both addresses as
the headless Service does, and the gateway's `dns:///clothing-model-headless:8500` must spread its calls over both.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import pytest
from test_compose_stack import (
    check_course_request,
    check_five_gateways_share_one_model,
    check_stopping_the_gateways_under_load,
    compose_stack,
)

import contract
from engine import (
    PHOTO,
    Load,
    build,
    call,
    inspect,
    note,
    remove,
    repository_context,
    run,
    unique,
)
from kubelet import PodContainer
from test_containers import MODEL_DOCKERFILE
from test_k8s import GATEWAY, MODEL, container, objects, pod_spec

pytestmark = pytest.mark.docker

MODEL_REPLICAS = 2
HEADLESS = "clothing-model-headless"


def service_aliases(target: str, deployment: str) -> list[str]:
    """The names of the Services that select this Deployment's pods: DNS names for them on the pod network."""
    labels = objects(target, "Deployment")[deployment]["spec"]["template"]["metadata"]["labels"]
    services = objects(target, "Service").items()
    return sorted(name for name, service in services if service["spec"]["selector"].items() <= labels.items())


@dataclass
class Pods:
    target: str
    network: str
    models: list[PodContainer]
    gateway: PodContainer
    model_image: str

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway.ip}:{self.gateway.port('http')}"

    def new_model(self, index: int) -> PodContainer:
        return PodContainer(
            name=f"{self.network}-model-{index}",
            spec=container(self.target, MODEL),
            pod_spec=pod_spec(self.target, MODEL),
            network=self.network,
            aliases=service_aliases(self.target, MODEL),
            image=self.model_image,
        )

    def all(self) -> list[PodContainer]:
        return [*self.models, self.gateway]


def start_pods(target: str, model_image: str, gateway_image: str, label: str = "") -> Pods:
    network = unique("zoomcamp-10-pods")
    run(["docker", "network", "create", network])
    gateway_pod = PodContainer(
        name=f"{network}-gateway",
        spec=container(target, GATEWAY),
        pod_spec=pod_spec(target, GATEWAY),
        network=network,
        aliases=service_aliases(target, GATEWAY),
        image=gateway_image,
    )
    pods = Pods(target, network, [], gateway_pod, model_image)
    pods.models = [pods.new_model(i) for i in range(MODEL_REPLICAS)]
    try:
        for pod in pods.models:
            pod.start()
        ready = [pod.wait_ready() for pod in pods.models]
        pods.gateway.start()
        ready.append(pods.gateway.wait_ready())
    except BaseException:
        stop_pods(pods)
        raise
    budgets = [pod.startup_budget() for pod in pods.all()]
    note(
        f"{target} pods on Docker{label}: model replicas Ready after {ready[0]:.0f} and {ready[1]:.0f} s, the gateway "
        f"after {ready[2]:.0f} s (the probes allow {budgets[0]:.0f} and {budgets[2]:.0f} s)"
    )
    return pods


def stop_pods(pods: Pods) -> None:
    for pod in pods.all():
        pod.stop_probing()
    remove(*(pod.name for pod in pods.all()))
    run(["docker", "network", "rm", pods.network], check=False)


def predict(pods: Pods):
    return call("POST", f"{pods.gateway_url}/predict", data=PHOTO, headers={"Content-Type": "image/jpeg"})


def received_bytes(pod: PodContainer) -> int:
    return int(run(["docker", "exec", pod.name, "cat", "/sys/class/net/eth0/statistics/rx_bytes"]).stdout)


# ---- the flows, for our model server here and for tensorflow/serving where it can be pulled ------------------


# The manifests' limits as they are written, and what they mean in bytes and CPUs (a limit not listed here fails
# the check below until it is added).
MEMORY_LIMITS = {"512Mi": 512 * 2**20, "1Gi": 2**30, "2Gi": 2 * 2**30}
CPU_LIMITS = {"500m": 0.5, "1": 1.0, "2": 2.0}
# Memory limit in bytes, then CPU quota and period: cgroup v2's files, else cgroup v1's.
_CGROUP_LIMITS = (
    "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max 2>/dev/null || cd /sys/fs/cgroup && "
    "cat memory/memory.limit_in_bytes cpu/cpu.cfs_quota_us cpu/cpu.cfs_period_us"
)


def enforced_limits(container_name: str) -> tuple[int, float]:
    """The memory (bytes) and CPUs the kernel holds a running container to, from its cgroup, read inside it."""
    memory, quota, period = run(["docker", "exec", container_name, "sh", "-c", _CGROUP_LIMITS]).stdout.split()
    return int(memory), int(quota) / int(period)


def check_containers_run_as_declared(pods: Pods) -> None:
    for pod in pods.all():
        host = inspect(pod.name)["HostConfig"]
        security = {**pod.pod_spec["securityContext"], **pod.spec["securityContext"]}
        limits = pod.spec["resources"]["limits"]
        assert inspect(pod.name)["Config"]["User"] == f"{security['runAsUser']}:{security['runAsGroup']}"
        assert run(["docker", "exec", pod.name, "id", "-u"]).stdout.strip() == str(security["runAsUser"])
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in host["SecurityOpt"]
        # What the kernel holds the container to, read inside it, against the manifest's limits as written.
        memory, cpus = enforced_limits(pod.name)
        assert memory == MEMORY_LIMITS[limits["memory"]] and cpus == CPU_LIMITS[str(limits["cpu"])], (memory, cpus)
        assert set(host["Tmpfs"]) == {mount["mountPath"] for mount in pod.spec["volumeMounts"]}
        # Privilege escalation is off for real: the kernel's no_new_privs flag of PID 1.
        status = run(["docker", "exec", pod.name, "cat", "/proc/1/status"]).stdout
        assert "NoNewPrivs:\t1" in status
        assert not pod.probe_failures("liveness"), pod.records[-5:]


def another_gateway(pods: Pods, suffix: str, **env: str) -> PodContainer:
    """One more gateway pod as the manifest declares it (with `env` added), Ready: for a check that changes it or
    needs it otherwise, so that the shared one stays as every other check expects it."""
    spec = copy.deepcopy(container(pods.target, GATEWAY))
    spec["env"] = [*spec.get("env", []), *({"name": name, "value": value} for name, value in env.items())]
    pod = PodContainer(
        name=f"{pods.network}-gateway-{suffix}",
        spec=spec,
        pod_spec=pod_spec(pods.target, GATEWAY),
        network=pods.network,
        aliases=[],
        image=pods.gateway.image,
    )
    pod.start()
    pod.wait_ready()
    return pod


def check_the_headless_service_spreads_calls(pods: Pods, reference: np.ndarray) -> dict[str, float]:
    # One gunicorn worker: one gRPC channel, so how the calls spread over the replicas is that channel's policy alone
    # (two workers, each with a channel of its own, could each land on another replica by chance).
    gateway = another_gateway(pods, "one-worker", GATEWAY_WORKERS="1")
    try:
        before = {pod.name: received_bytes(pod) for pod in pods.models}
        url = f"http://{gateway.ip}:{gateway.port('http')}/predict"
        outcomes = Load([url], PHOTO, clients=4, max_requests=100, max_seconds=120).start().stop_when_done()
        received = {pod.name: received_bytes(pod) - before[pod.name] for pod in pods.models}
    finally:
        gateway.stop_probing()
        remove(gateway.name)
    assert [o.status for o in outcomes] == [200] * 100, [o for o in outcomes if o.status != 200][:3]
    shares = {name: value / sum(received.values()) for name, value in received.items()}
    # Each call carries the photo's 299x299x3 uint8 pixels (268 KB): the bytes each replica received are its share
    # of the calls. Round robin gives each about half; one channel picking one replica would give one all of them.
    print("share of the 100 calls per model replica:", {name[-7:]: f"{share:.0%}" for name, share in shares.items()})
    assert all(share >= 0.3 for share in shares.values()), shares
    status, _, answer = predict(pods)
    served = np.array([answer[name] for name in contract.CLASSES], dtype=np.float32)
    assert np.abs(served - reference).max() <= 1e-4
    return shares


def check_model_tier_down_and_back(pods: Pods) -> None:
    """Both model replicas gone: the gateway stays Ready (in the Service) and answers JSON 503 with Retry-After;
    /readyz says why. New model pods (new addresses): the gateway finds them and predicts again."""
    for pod in pods.models:
        pod.stop_probing()
    remove(*(pod.name for pod in pods.models))
    down_at = pods.gateway.seconds()
    readiness = pods.gateway.spec["readinessProbe"]
    # Longer than the readiness probe needs to take a pod out of the Service.
    watch = readiness["periodSeconds"] * readiness["failureThreshold"] + 5
    answers = []
    while pods.gateway.seconds() - down_at < watch:
        answers.append(predict(pods))
        assert pods.gateway.ready, "the gateway left the Service because the model tier is down"
        time.sleep(0.5)
    assert not pods.gateway.probe_failures("readiness", since=down_at)
    assert not pods.gateway.probe_failures("liveness", since=down_at)
    for status, headers, body in answers:
        assert status == 503, body
        assert body["error"]["code"] == "model_unavailable" and headers["Retry-After"] == "1"
    status, _, body = call("GET", f"{pods.gateway_url}/readyz")
    assert status == 503 and body["error"]["code"] == "model_unavailable", body
    print(f"model tier down for {watch} s: {len(answers)} answers, all JSON 503; /readyz: {body['error']['message']}")

    pods.models = [pods.new_model(i) for i in range(MODEL_REPLICAS, 2 * MODEL_REPLICAS)]
    for pod in pods.models:
        pod.start()
    for pod in pods.models:
        pod.wait_ready()
    back_at = time.monotonic()
    while True:
        status, _, body = predict(pods)
        if status == 200:
            break
        assert time.monotonic() - back_at < 30, f"the gateway did not find the new model pods: {body}"
        time.sleep(0.5)
    print(f"new model pods Ready: the gateway predicts again after {time.monotonic() - back_at:.1f} s")


def check_kubelet_stop_fails_no_request(pods: Pods) -> dict:
    """preStop, SIGTERM, SIGKILL after the grace period, on a gateway pod of its own, with 4 clients sending until
    the SIGTERM (as if the endpoint removal took all of preStop): every request sent before the SIGTERM, those sent
    during preStop among them, is answered 200."""
    gateway = another_gateway(pods, "stopped")
    load = Load([f"http://{gateway.ip}:{gateway.port('http')}/predict"], PHOTO, clients=4, max_requests=5000)
    load.start()
    while load.count() < 20:
        time.sleep(0.05)
    marks = {"terminate": time.monotonic()}

    def at_sigterm():
        load.stop_sending()
        marks["sigterm"] = time.monotonic()

    try:
        stopped = gateway.terminate(on_sigterm=at_sigterm)
        outcomes = load.stop_when_done()
    finally:
        gateway.stop_probing()
        remove(gateway.name)
    before = [o for o in outcomes if o.started < marks["sigterm"]]
    in_flight = [o for o in before if o.ended > marks["sigterm"]]
    during_pre_stop = [o for o in before if o.started >= marks["terminate"]]
    print(
        f"kubelet stop: {stopped}; {len(before)} requests before SIGTERM, {len(during_pre_stop)} of them during "
        f"preStop, {len(in_flight)} in flight at it"
    )
    assert during_pre_stop, "the clients should go on sending during preStop"
    assert all(o.status == 200 for o in before), [o for o in before if o.status != 200][:5]
    assert all(o.status in (200, None) for o in outcomes)
    assert in_flight, "the SIGTERM should find requests in flight"
    assert not stopped["sigkill"] and stopped["exit_code"] == 0, stopped
    return stopped


# ---- the tests ---------------------------------------------------------------------------------------------


def test_the_same_compose_and_pods_with_tensorflow_serving(
    tf_serving_base, gateway_image, model_base, tmp_path_factory, photo_server, reference
):
    """Where tensorflow/serving can be pulled: the compose stack as it is, and k8s/overlays/kind as it is, with the
    stand-in baked into the TF Serving image. Here that image cannot be had, and this one test says so."""
    image = "zoomcamp-10-model:test"
    build(MODEL_DOCKERFILE, image, repository_context(model_base, tmp_path_factory.mktemp("tf-serving-context")))
    images = {"MODEL_IMAGE": image, "GATEWAY_IMAGE": gateway_image}
    with compose_stack(["docker-compose.yaml"], images, photo_server) as stack:
        check_course_request(stack, reference)
        check_five_gateways_share_one_model(stack, reference)
        check_stopping_the_gateways_under_load(stack)
    started = start_pods("kind", image, gateway_image)
    try:
        check_containers_run_as_declared(started)
        check_the_headless_service_spreads_calls(started, reference)
        check_model_tier_down_and_back(started)
        check_kubelet_stop_fails_no_request(started)
    finally:
        stop_pods(started)
