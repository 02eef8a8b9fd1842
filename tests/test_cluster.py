"""The manifests on a real Kubernetes: k8s/overlays/arm64 (our model-server image) applied with kubectl to a cluster
whose node runs pods on this machine's Docker engine, so the images the suite builds are there to run.

In CI that is the v1.20 cluster .ci/cluster.sh builds from Debian 12's source package: a real API server,
scheduler, controller manager, kubelet and kube-proxy, with dnsmasq fed from the API's Services and Endpoints
standing in for CoreDNS (none is packaged anywhere reachable here). What only a control plane shows is tested
here: rollouts, the kubelet's probes, limits and stops, Services and their DNS names, scaling, scheduling on an
extended resource, disruption budgets. Without such a cluster these tests skip and say why; CI sets
ZOOMCAMP_REQUIRE_CLUSTER=1 where it provides one, and then they fail instead.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import yaml
from test_pods import CPU_LIMITS, MEMORY_LIMITS, enforced_limits

import capabilities
import contract
import real_answers
from conftest import ROOT, execute_notebook, tagged_result
from engine import PHOTO, Load, call, host_address, run, unique
from servers import free_port
from test_k8s import GATEWAY, MODEL
from test_k8s import KUBECTL as KUSTOMIZE_KUBECTL

pytestmark = [pytest.mark.cluster, pytest.mark.docker]

# The kubectl of the cluster's own version where .ci/cluster.sh made one (it talks to a v1.20 API server as a
# client of its version should); the environment's otherwise. Rendering always takes the environment's kubectl,
# whose kustomize knows components.
KUBECTL = os.environ.get("ZOOMCAMP_KUBECTL") or str(KUSTOMIZE_KUBECTL)
GPU = "nvidia.com/gpu"


def kubectl(*args: str, timeout: float = 120, check: bool = True, stdin: str | None = None) -> str:
    result = subprocess.run([KUBECTL, *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr}{result.stdout}")
    return result.stdout


def kubectl_json(*args: str) -> dict:
    return json.loads(kubectl(*args, "-o", "json"))


class Api:
    """The API server itself, with kubectl's credentials, for what kubectl 1.20 cannot send (a node's status)."""

    def __init__(self):
        config = yaml.safe_load(kubectl("config", "view", "--raw", "--minify", "-o", "yaml"))
        cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
        self.server = cluster["server"]
        self._files = tempfile.TemporaryDirectory()
        folder = Path(self._files.name)
        for name, key in (("ca", "certificate-authority-data"), ("crt", "client-certificate-data")):
            (folder / name).write_bytes(base64.b64decode(cluster[key] if name == "ca" else user[key]))
        (folder / "key").write_bytes(base64.b64decode(user["client-key-data"]))
        self.verify, self.cert = str(folder / "ca"), (str(folder / "crt"), str(folder / "key"))

    def patch(self, path: str, operations: list[dict]) -> requests.Response:
        headers = {"Content-Type": "application/json-patch+json"}
        return requests.patch(
            f"{self.server}{path}", json=operations, headers=headers, cert=self.cert, verify=self.verify, timeout=30
        )


@pytest.fixture(scope="module")
def cluster() -> SimpleNamespace:
    """The cluster kubectl reaches, if its node runs pods on this machine's Docker engine."""
    if subprocess.run([KUBECTL, "get", "--raw=/readyz"], capture_output=True, timeout=30).returncode != 0:
        capabilities.unavailable(
            "kubectl reaches no cluster (`kubectl get --raw=/readyz` failed)", capabilities.CLUSTER
        )
    (node,) = kubectl_json("get", "nodes")["items"]
    runtime = node["status"]["nodeInfo"]["containerRuntimeVersion"]
    engine = run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False).stdout.strip()
    if not engine or not runtime.startswith(f"docker://{engine}"):
        capabilities.unavailable(
            f"the cluster's node runs {runtime}, not this machine's Docker engine ({engine or 'none'}): the images "
            "the suite builds are not there",
            capabilities.CLUSTER,
        )
    version = json.loads(kubectl("version", "-o", "json"))["serverVersion"]
    return SimpleNamespace(
        node=node["metadata"]["name"], minor=int(version["minor"].rstrip("+")), version=version["gitVersion"]
    )


# What each container asks the scheduler for, here: the manifests ask 1 CPU per model replica and a quarter per
# gateway, which on a node of 2 CPUs leaves no room for a second model replica or a rolling update's extra pod.
# The limits, which the kubelet enforces (and a test checks), stay as declared.
TEST_CPU_REQUEST = "100m"


def render(overlay: str, minor: int, images: dict[str, str], folder: Path) -> str:
    """The overlay as the suite applies it: its images set to the ones the suite built, its CPU requests scaled down
    to fit one small node (TEST_CPU_REQUEST), and for a cluster older than 1.21 the apiVersions it serves
    (k8s/components/kubernetes-1.20)."""
    components = ["kubernetes-1.20"] if minor < 21 else []
    request = {"op": "replace", "path": "/spec/template/spec/containers/0/resources/requests/cpu"}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "k8s" / "overlays" / overlay, folder)],
        "components": [os.path.relpath(ROOT / "k8s" / "components" / c, folder) for c in components],
        "images": [
            {"name": name, "newName": image.split(":")[0], "newTag": image.split(":")[1]}
            for name, image in images.items()
        ],
        "patches": [{"target": {"kind": "Deployment"}, "patch": json.dumps([{**request, "value": TEST_CPU_REQUEST}])}],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = subprocess.run([KUSTOMIZE_KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def rollout(namespace: str, deployment: str, timeout: int = 600) -> None:
    kubectl(
        "rollout", "status", "-n", namespace, f"deployment/{deployment}", f"--timeout={timeout}s", timeout=timeout + 30
    )


def pods(namespace: str, name: str) -> list[dict]:
    selector = f"app.kubernetes.io/name={name}"
    return kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]


def live_pods(namespace: str, name: str) -> list[dict]:
    """The pods not being deleted (a deleted one may still be stopping, in its preStop)."""
    return [p for p in pods(namespace, name) if not p["metadata"].get("deletionTimestamp")]


def ready(pod: dict) -> bool:
    conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return conditions.get("Ready") == "True" and pod["metadata"].get("deletionTimestamp") is None


def wait_for(condition, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)
    return value


def container_of(namespace: str, pod: str, name: str) -> str:
    """The Docker container the kubelet runs for a pod's container (dockershim labels it with both names)."""
    found = run([
        "docker", "ps", "-q", "--filter", f"label=io.kubernetes.pod.namespace={namespace}",
        "--filter", f"label=io.kubernetes.pod.name={pod}", "--filter", f"label=io.kubernetes.container.name={name}",
    ]).stdout.split()  # fmt: skip
    assert len(found) == 1, f"{namespace}/{pod}/{name}: {found}"
    return found[0]


@contextlib.contextmanager
def deploy(cluster, images: dict[str, str], folder: Path):
    """k8s/overlays/arm64 with `images` in a namespace of its own, rolled out; removed with the namespace
    afterwards."""
    namespace = unique("zoomcamp-10-cluster")
    manifests = render("arm64", cluster.minor, images, folder)
    kubectl("create", "namespace", namespace)
    try:
        started = time.monotonic()
        kubectl("apply", "-n", namespace, "-f", "-", stdin=manifests)
        for deployment in (MODEL, GATEWAY):
            rollout(namespace, deployment)
        # Just after the apply, the HPA raises the gateways to its minimum: wait for those to be Ready too.
        minimum = kubectl_json("get", "hpa", GATEWAY, "-n", namespace)["spec"]["minReplicas"]

        def gateways_ready() -> bool:
            status = kubectl_json("get", "deployment", GATEWAY, "-n", namespace)["status"]
            return status.get("readyReplicas", 0) >= minimum and status.get("replicas", 0) == minimum

        wait_for(gateways_ready, 600, f"{minimum} gateways Ready")
        service = kubectl_json("get", "service", GATEWAY, "-n", namespace)
        url = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
        print(f"\n{cluster.version}: k8s/overlays/arm64 rolled out in {time.monotonic() - started:.0f} s")
        yield SimpleNamespace(namespace=namespace, url=url, cluster=cluster)
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def deployed(cluster, gateway_image, model_server_image, tmp_path_factory):
    images = {"zoomcamp-10-model-server": model_server_image, "zoomcamp-10-gateway": gateway_image}
    with deploy(cluster, images, tmp_path_factory.mktemp("overlay")) as running:
        yield running


def predict(url: str):
    return call("POST", f"{url}/predict", data=PHOTO, headers={"Content-Type": "image/jpeg"})


def scale(namespace: str, deployment: str, replicas: int, drop_at_once: bool = False) -> None:
    """`replicas` pods Ready, and no others but those still stopping (a model pod serves on for 40 s in its preStop).
    With `drop_at_once`, the pods scaled away are killed instead (`--grace-period=0 --force`): for a test that
    needs them gone, not drained."""
    kubectl("scale", "-n", namespace, f"deployment/{deployment}", f"--replicas={replicas}")
    if replicas:
        rollout(namespace, deployment)
    wait_for(lambda: len(live_pods(namespace, deployment)) == replicas, 120, f"{replicas} {deployment} pods")
    if drop_at_once:
        stopping = [
            p["metadata"]["name"] for p in pods(namespace, deployment) if p["metadata"].get("deletionTimestamp")
        ]
        if stopping:
            kubectl("delete", "pod", "-n", namespace, "--grace-period=0", "--force", *stopping)
        wait_for(lambda: len(pods(namespace, deployment)) == replicas, 120, f"only {replicas} {deployment} pods")


def failed_attempts(namespace: str) -> int:
    """How many times the scheduler has tried a namespace's pods and found no node (its FailedScheduling events)."""
    events = kubectl_json("get", "events", "-n", namespace, "--field-selector", "reason=FailedScheduling")["items"]
    return sum(event.get("count") or 1 for event in events)


# ---- the tests ----------------------------------------------------------------------------------------------


def test_the_trained_model_answers_every_test_photo_through_the_gateway_service(
    dataset, cluster, gateway_image, trained_model_server_image, tmp_path
):
    """The model trained here (notebook 00) in our model-server image, deployed as the overlay deploys the model
    tier, in a namespace of its own: through the gateway's Service, on each of the 372 test photos the top class
    of the model in process, and the accuracy notebook 00 reported."""
    images = {"zoomcamp-10-model-server": trained_model_server_image, "zoomcamp-10-gateway": gateway_image}
    with deploy(cluster, images, tmp_path / "overlay") as trained:
        report = real_answers.check_gateway(trained.url, dataset)
    print(
        f"the cluster with the trained model: {report.correct} of {report.photos} test photos right "
        f"({report.accuracy:.1%}), logits within {report.largest_logit_difference:.2g} of the model in process"
    )
    assert report.photos == 372 and report.largest_logit_difference <= 1e-5 * report.largest_logit


def test_a_photo_uploaded_through_the_gateway_service_is_answered(deployed, reference):
    status, headers, answer = predict(deployed.url)
    assert status == 200, answer
    served = np.array([answer[name] for name in contract.CLASSES], dtype=np.float32)
    assert np.abs(served - reference).max() <= 1e-4
    status, _, readiness = call("GET", f"{deployed.url}/readyz")
    assert status == 200 and "AVAILABLE" in readiness["detail"]


def test_the_kubelet_runs_each_container_as_the_manifest_declares(deployed):
    declared = {
        doc["metadata"]["name"]: doc["spec"]["template"]["spec"]
        for doc in (kubectl_json("get", "deployments", "-n", deployed.namespace)["items"])
    }
    for deployment, spec in declared.items():
        (container,) = spec["containers"]
        security = {**spec["securityContext"], **container["securityContext"]}
        limits = container["resources"]["limits"]
        for pod in live_pods(deployed.namespace, deployment):
            assert ready(pod), pod["metadata"]["name"]
            name = container_of(deployed.namespace, pod["metadata"]["name"], container["name"])
            assert run(["docker", "exec", name, "id", "-u"]).stdout.strip() == str(security["runAsUser"])
            host = json.loads(run(["docker", "inspect", name]).stdout)[0]["HostConfig"]
            assert host["ReadonlyRootfs"] is True and set(host["CapDrop"] or []) >= {"ALL"}, host["CapDrop"]
            assert "NoNewPrivs:\t1" in run(["docker", "exec", name, "cat", "/proc/1/status"]).stdout
            memory, cpus = enforced_limits(name)
            assert (memory, cpus) == (MEMORY_LIMITS[limits["memory"]], CPU_LIMITS[str(limits["cpu"])]), deployment
            restarts = pod["status"]["containerStatuses"][0]["restartCount"]
            assert restarts == 0, f"{pod['metadata']['name']} restarted {restarts} times: a probe failed?"


def test_the_headless_service_spreads_one_gateways_calls_over_two_model_replicas(deployed):
    """Two model replicas behind clothing-model-headless, as the cluster's DNS answers it, and one gateway pod with
    one worker (one gRPC channel): once the gateway has both addresses, round robin gives each replica half of the
    calls, within five points (the probes' few bytes aside, each call brings the same bytes)."""
    namespace = deployed.namespace
    scale(namespace, MODEL, 2)
    template = kubectl_json("get", "deployment", GATEWAY, "-n", namespace)["spec"]["template"]
    template["spec"]["containers"][0]["env"].append({"name": "GATEWAY_WORKERS", "value": "1"})
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gateway-one-worker"}, "spec": template["spec"]}
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(pod))
    try:
        wait_for(lambda: ready(kubectl_json("get", "pod", "gateway-one-worker", "-n", namespace)), 300, "the pod")
        url = f"http://{kubectl_json('get', 'pod', 'gateway-one-worker', '-n', namespace)['status']['podIP']}:9696"
        # Its DNS answer may be one the cache kept from before the second replica was Ready.
        wait_for(lambda: model_addresses(url) == 2, DISCOVERY_SECONDS, "the gateway to know both replicas", 0.5)
        traffic = ModelTraffic(namespace)
        before = traffic.received()
        outcomes = Load([f"{url}/predict"], PHOTO, clients=4, max_requests=100).start().stop_when_done()
        after = traffic.received()
    finally:
        kubectl("delete", "pod", "gateway-one-worker", "-n", namespace, "--wait=false", check=False)
        scale(namespace, MODEL, 1)
    assert [o.status for o in outcomes] == [200] * 100, [o for o in outcomes if o.status != 200][:3]
    grown = [after[name] - before[name] for name in before]
    print(f"share of 100 calls per model replica: {[f'{g / sum(grown):.1%}' for g in grown]}")
    assert len(grown) == 2 and all(0.45 <= g / sum(grown) <= 0.55 for g in grown), grown


def model_addresses(gateway_url: str) -> float | None:
    """The model server addresses a gateway calls, as its /metrics says."""
    text = requests.get(f"{gateway_url}/metrics", timeout=5).text
    found = re.search(r"^gateway_model_addresses (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_a_rolling_update_of_the_gateway_under_load_answers_every_request(deployed):
    """kubectl rollout restart while clients post photos through the Service: the old pods leave the Service during
    their preStop, then drain; every request gets its answer."""
    namespace = deployed.namespace
    before = {p["metadata"]["name"] for p in pods(namespace, GATEWAY)}
    load = Load([f"{deployed.url}/predict"], PHOTO, clients=4, max_requests=5000, max_seconds=300).start()
    wait_for(lambda: load.count() >= 20, 60, "the first answers", every=0.1)
    kubectl("rollout", "restart", "-n", namespace, f"deployment/{GATEWAY}")
    rollout(namespace, GATEWAY)
    wait_for(lambda: not before & {p["metadata"]["name"] for p in pods(namespace, GATEWAY)}, 120, "the old pods gone")
    outcomes = load.stop()
    failed = [o for o in outcomes if o.status != 200]
    print(f"rolling update under load: {len(outcomes)} requests, {len(failed)} not answered 200")
    assert not failed, failed[:5]


def test_with_the_model_tier_at_zero_the_gateways_stay_in_the_service_and_answer_503(deployed):
    namespace = deployed.namespace
    scale(namespace, MODEL, 0, drop_at_once=True)
    try:
        down_at = time.monotonic()
        answers = []
        while time.monotonic() - down_at < 15:  # longer than the readiness probe takes to drop a failing pod
            answers.append(predict(deployed.url))
            endpoints = kubectl_json("get", "endpoints", GATEWAY, "-n", namespace)
            addresses = [a for s in endpoints.get("subsets") or [] for a in s.get("addresses", [])]
            assert len(addresses) == 2, "a gateway left the Service because the model tier is down"
            time.sleep(1)
    finally:
        scale(namespace, MODEL, 1)
    for status, headers, body in answers:
        assert status == 503 and body["error"]["code"] == "model_unavailable", body
        assert headers["Retry-After"] == "1"
    wait_for(lambda: predict(deployed.url)[0] == 200, 120, "a 200 once the model tier is back")


def test_the_disruption_budget_blocks_an_eviction_that_would_break_it(deployed):
    """minAvailable 1 of 2 gateways: one eviction is allowed, the next (its replacement not Ready yet) is not."""
    namespace = deployed.namespace
    rollout(namespace, GATEWAY)
    first, second = sorted(p["metadata"]["name"] for p in pods(namespace, GATEWAY))[:2]
    group = "policy/v1beta1" if deployed.cluster.minor < 22 else "policy/v1"

    def evict(pod: str) -> subprocess.CompletedProcess:
        eviction = {"apiVersion": group, "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction"
        return subprocess.run(
            [KUBECTL, "create", "--raw", path, "-f", "-"], input=json.dumps(eviction), capture_output=True, text=True
        )

    assert evict(first).returncode == 0
    refused = evict(second)
    assert refused.returncode != 0 and "disruption budget" in refused.stderr, refused.stderr
    rollout(namespace, GATEWAY)


def test_the_autoscaler_is_accepted_and_says_it_has_no_metrics(deployed):
    """The HPA object is valid here; with no metrics-server in this cluster it cannot read CPU, so it cannot
    scale, and says so in its conditions (read in the version that has them: kubectl prefers autoscaling/v1)."""
    resource = "hpa.v2beta2.autoscaling" if deployed.cluster.minor < 23 else "hpa.v2.autoscaling"

    def scaling_active() -> dict | None:
        status = kubectl_json("get", resource, GATEWAY, "-n", deployed.namespace)["status"]
        return {c["type"]: c for c in status.get("conditions") or []}.get("ScalingActive")

    hpa = kubectl_json("get", resource, GATEWAY, "-n", deployed.namespace)
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    condition = wait_for(scaling_active, 120, "the HPA's ScalingActive condition")
    assert condition["status"] == "False" and condition["reason"] == "FailedGetResourceMetric", condition


def test_the_gpu_overlays_model_waits_for_a_gpu_and_schedules_once_the_node_has_one(cluster, tmp_path):
    """The gpu overlay's model asks for nvidia.com/gpu on the GPU node group: on a node without it the pod stays
    Pending; once the node advertises a GPU (an extended resource on its status, as the device plugin would set it)
    and carries the node group's label, it is scheduled there."""
    namespace = unique("zoomcamp-10-gpu")
    manifests = render("gpu", cluster.minor, {}, tmp_path / "overlay")
    model = next(
        doc
        for doc in yaml.safe_load_all(manifests)
        if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"] == MODEL
    )
    label = next(iter(model["spec"]["template"]["spec"]["nodeSelector"].items()))
    api = Api()
    kubectl("create", "namespace", namespace)
    try:
        kubectl("label", "node", cluster.node, f"{label[0]}={label[1]}", "--overwrite")
        kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(model))

        def scheduling() -> dict | None:
            items = kubectl_json("get", "pods", "-n", namespace)["items"]
            conditions = {c["type"]: c for c in items[0]["status"].get("conditions", [])} if items else {}
            return conditions.get("PodScheduled")

        pending = wait_for(scheduling, 60, "the scheduler's verdict")
        assert pending["status"] == "False" and "Insufficient nvidia.com/gpu" in pending["message"], pending
        # The scheduler tries again on its own: after another attempt it must still find no GPU.
        wait_for(lambda: failed_attempts(namespace) >= 2, 120, "the scheduler's second attempt")
        pending = scheduling()
        assert pending["status"] == "False" and "Insufficient nvidia.com/gpu" in pending["message"], pending
        gpu = "nvidia.com~1gpu"  # "/" in a JSON Pointer
        added = api.patch(
            f"/api/v1/nodes/{cluster.node}/status", [{"op": "add", "path": f"/status/capacity/{gpu}", "value": "1"}]
        )
        assert added.status_code == 200, added.text
        scheduled = wait_for(lambda: (s := scheduling()) and s["status"] == "True" and s, 120, "the pod scheduled")
        assert scheduled["status"] == "True"
        assert kubectl_json("get", "pods", "-n", namespace)["items"][0]["spec"]["nodeName"] == cluster.node
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        kubectl("label", "node", cluster.node, f"{label[0]}-", check=False)
        api.patch(
            f"/api/v1/nodes/{cluster.node}/status", [{"op": "remove", "path": "/status/capacity/nvidia.com~1gpu"}]
        )


def model_pods(namespace: str) -> set[str]:
    return {p["metadata"]["name"] for p in pods(namespace, MODEL)}


class ModelTraffic:
    """The bytes each model pod has received, read from the host (/proc/<pid>/net/dev of the pod's container), so
    the share of the calls each replica gets can be followed second by second without a request to it."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    def received(self) -> dict[str, int]:
        counts = {}
        for pod in pods(self.namespace, MODEL):
            name = pod["metadata"]["name"]
            if not ready(pod):
                continue
            found = run(["docker", "ps", "-q", "--filter", f"label=io.kubernetes.pod.namespace={self.namespace}",
                         "--filter", f"label=io.kubernetes.pod.name={name}",
                         "--filter", f"label=io.kubernetes.container.name={MODEL}"]).stdout.split()  # fmt: skip
            if len(found) != 1:
                continue
            pid = run(["docker", "inspect", "--format", "{{.State.Pid}}", found[0]]).stdout.strip()
            lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()
            counts[name] = sum(int(line.split()[1]) for line in lines if line.strip().startswith("eth0:"))
        return counts

    def shares(self, seconds: float) -> dict[str, float]:
        """Each Ready model pod's share of the bytes received over the next `seconds`."""
        before = self.received()
        time.sleep(seconds)
        after = self.received()
        grown = {name: after[name] - before[name] for name in after.keys() & before.keys()}
        total = sum(grown.values())
        return {name: (value / total if total else 0.0) for name, value in grown.items()}

    def wait_until_each_gets(self, replicas: int, at_least: float, timeout: float, window: float = 3.0) -> float:
        """Seconds until each of `replicas` Ready model pods gets at least `at_least` of the calls over a window."""
        started = time.monotonic()
        while True:
            shares = self.shares(window)
            if len(shares) == replicas and min(shares.values()) >= at_least:
                return time.monotonic() - started
            assert time.monotonic() - started < timeout, f"after {timeout:.0f} s the shares are {shares}"


def failures_report(outcomes, since: float) -> str:
    failed = sorted((o for o in outcomes if o.status != 200), key=lambda o: o.started)
    kinds: dict[str, int] = {}
    for o in failed:
        key = f"{o.status} {o.error}: {o.detail[:120]}"
        kinds[key] = kinds.get(key, 0) + 1
    span = f"from {failed[0].started - since:.1f} s to {failed[-1].ended - since:.1f} s" if failed else ""
    return f"{len(failed)} of {len(outcomes)} failed {span}: {kinds}"


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_rollout_of_the_model_tier_under_keep_alive_load_loses_nothing(deployed, replicas):
    """kubectl rollout restart of the model tier while clients post photos through the gateway Service, each on a
    keep-alive connection: every request is answered 200, before, during and after the rollout."""
    namespace = deployed.namespace
    scale(namespace, MODEL, replicas)
    load = Load([f"{deployed.url}/predict"], PHOTO, clients=4, max_requests=100_000, max_seconds=600, keep_alive=True)
    load.start()
    wait_for(lambda: load.count() >= 20, 60, "the first answers", every=0.1)
    old = model_pods(namespace)
    restarted = time.monotonic()
    kubectl("rollout", "restart", "-n", namespace, f"deployment/{MODEL}")
    rollout(namespace, MODEL)
    wait_for(lambda: not old & model_pods(namespace), 180, "the old model pods gone")
    gone = time.monotonic()
    time.sleep(3)
    outcomes = sorted(load.stop(), key=lambda o: o.started)
    try:
        report = failures_report(outcomes, restarted)
        print(f"model rollout, {replicas} replica(s): {report}; old pods gone after {gone - restarted:.0f} s")
        assert outcomes[-1].ended > gone, "the load ended before the rollout did"
        assert all(o.status == 200 for o in outcomes), report
    finally:
        scale(namespace, MODEL, 1)


# The DNS of a kubeadm cluster (and of CI's, .ci/cluster.sh) caches answers for 30 s, and the gateways look the model
# tier's name up every 2 s: a new model pod gets calls within that, and a margin for this small machine.
DISCOVERY_SECONDS = 30 + 2 + 3


def keep_alive_load(deployed) -> Load:
    load = Load([f"{deployed.url}/predict"], PHOTO, clients=4, max_requests=100_000, max_seconds=600, keep_alive=True)
    load.start()
    wait_for(lambda: load.count() >= 20, 60, "the first answers", every=0.1)
    return load


def test_a_model_replica_added_under_load_gets_its_share_within_the_dns_cache_time(deployed):
    """Scaled from 1 to 2 under keep-alive load: the new replica takes at least a third of the calls within the
    DNS cache's 30 s and the gateways' lookup interval from the moment it is Ready, and no request fails."""
    namespace = deployed.namespace
    scale(namespace, MODEL, 1)
    traffic = ModelTraffic(namespace)
    load = keep_alive_load(deployed)
    try:
        kubectl("scale", "-n", namespace, f"deployment/{MODEL}", "--replicas=2")
        wait_for(lambda: sum(ready(p) for p in pods(namespace, MODEL)) == 2, 300, "the second replica Ready", 0.2)
        took = traffic.wait_until_each_gets(2, 1 / 3, timeout=120, window=2.0)
    finally:
        outcomes = load.stop()
        scale(namespace, MODEL, 1)
    print(f"scale-up: the new replica got a third of the calls {took:.0f} s after it was Ready; "
          f"{failures_report(outcomes, outcomes[0].started)}")  # fmt: skip
    assert took <= DISCOVERY_SECONDS, f"{took:.0f} s"
    assert all(o.status == 200 for o in outcomes), failures_report(outcomes, outcomes[0].started)


def test_a_killed_model_pod_fails_at_most_the_calls_in_flight_on_it(deployed):
    """Two model replicas, each with its share of the calls; one force-deleted under load
    (kubectl delete pod --grace-period=0 --force): only calls that were on it when it went may fail, and none
    that started a second later."""
    namespace = deployed.namespace
    scale(namespace, MODEL, 2)
    traffic = ModelTraffic(namespace)
    load = keep_alive_load(deployed)
    try:
        traffic.wait_until_each_gets(2, 1 / 3, timeout=120, window=2.0)
        victim = sorted(model_pods(namespace))[0]
        killed = time.monotonic()
        kubectl("delete", "pod", victim, "-n", namespace, "--grace-period=0", "--force")
        time.sleep(10)
    finally:
        outcomes = load.stop()
        scale(namespace, MODEL, 1)
    failed = [o for o in outcomes if o.status != 200]
    print(f"killed model pod: {failures_report(outcomes, killed)}")
    assert len(failed) <= load.clients, failures_report(outcomes, killed)
    assert all(o.started < killed + 1 for o in failed), failures_report(outcomes, killed)


def test_notebook_06_takes_the_courses_kubernetes_steps(cluster, gateway_image, model_server_image, photo_server,
                                                        reference, tmp_path_factory):  # fmt: skip
    """Notebook 06 top to bottom against this cluster, with the images the suite built: the minimal Deployments and
    Services answer the course's client and the course's request as the in-process model does, then the production
    overlay (arm64: our model server), with the manifests' own CPU requests, answers the same; and the namespace
    is deleted."""
    work = tmp_path_factory.mktemp("notebook-06")
    (work / "photo.jpg").write_bytes(PHOTO)
    namespace = unique("zoomcamp-10-nb06")
    started = time.monotonic()
    shown, _ = execute_notebook(
        ROOT / "notebooks" / "06-kubernetes.ipynb",
        work / "06.ipynb",
        ROOT,
        cluster="current",
        kubectl=KUBECTL,
        model_image=model_server_image,
        gateway_image=gateway_image,
        overlay="arm64",
        namespace=namespace,
        local_port=free_port(),
        photo=str(work / "photo.jpg"),
        photo_url=f"http://{host_address()}:{photo_server}/pants.jpg",
        fetch_allow_hosts=host_address(),
    )
    print(f"notebook 06 ran in {time.monotonic() - started:.0f} s")
    section_2 = tagged_result(work / "06.ipynb")
    assert np.abs(np.array([section_2[c] for c in contract.CLASSES]) - reference).max() <= 1e-3  # rounded to 3 places
    differences = [float(d) for d in re.findall(r"largest difference from section 2: (\S+)", shown)]
    assert len(differences) == 1 and differences[0] <= 1e-4
    assert f"production manifests: {contract.CLASSES[int(np.argmax(reference))]}" in shown
    wait_for(lambda: namespace not in kubectl("get", "namespaces"), 300, "the notebook's namespace deleted", 2)
