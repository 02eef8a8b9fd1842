"""The manifests on a real Kubernetes (tests/cluster.py): k8s/overlays/litert, our model server on LiteRT and the
gateway, applied with kubectl to the cluster and run by its kubelet on this machine's Docker engine.

What only a control plane shows is tested here: rollouts of either tier under load, the kubelet's probes, limits
and stops, Services and their DNS names, scaling and a killed model pod, scheduling on an extended resource,
disruption budgets, and notebook 06 with the manifests' own CPU requests. The arm64 overlay runs on it in
tests/test_arm64.py.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import yaml

import contract
import real_answers
from cluster import (
    DISCOVERY_SECONDS,
    GATEWAY,
    KUBECTL,
    MODEL,
    AccessLogs,
    Api,
    ContainerStops,
    Deletions,
    ModelTraffic,
    check_containers_as_declared,
    deploy,
    failed_attempts,
    failures_report,
    frozen,
    keep_alive_load,
    keep_alive_on_each,
    kubectl,
    kubectl_json,
    model_addresses,
    model_pods,
    pods,
    predict,
    ready,
    render,
    rollout,
    scale,
    service_addresses,
    trickled,
    wait_for,
)
from conftest import PHASES, ROOT, execute_notebook, tagged_result
from engine import PHOTO, Load, call, host_address, unique
from servers import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.docker]


@pytest.fixture(scope="module")
def deployed(cluster, gateway_image, litert_image, tmp_path_factory):
    """k8s/overlays/litert in a namespace of its own, rolled out; removed with the namespace afterwards. Our model
    server on LiteRT is ready a second after it starts, so rollouts and scale-ups wait on the cluster, not on it."""
    images = {"zoomcamp-10-model-server-litert": litert_image, "zoomcamp-10-gateway": gateway_image}
    with deploy(cluster, "litert", images, tmp_path_factory.mktemp("overlay")) as running:
        yield running


@pytest.fixture(autouse=True)
def settled(request):
    """Before each test of the module's deployment, the state it starts from, whichever tests ran before it or were
    left out (-k, --lf, another order): one model replica, the HPA's two gateways, every pod Ready and no gateway
    stopping. After the test before it put things back, this only looks. After a test that failed, it prints the
    pods' last log lines for its report."""
    if "deployed" not in request.fixturenames:
        yield
        return
    namespace = request.getfixturevalue("deployed").namespace
    scale(namespace, MODEL, 1)
    rollout(namespace, GATEWAY)

    def two_gateways_ready() -> bool:
        gateways = pods(namespace, GATEWAY)  # stopping ones too
        return len(gateways) == 2 and all(ready(p) for p in gateways)

    wait_for(two_gateways_ready, 180, "two gateways Ready and none stopping", 0.5)
    yield
    called = request.node.stash.get(PHASES, {}).get("call")
    if called and called.failed:
        show_logs(namespace)


def show_logs(namespace: str, lines: int = 40) -> None:
    """For the report of a test that failed: each of the namespace's pods' last log lines, but the 200s and probes
    of the access log."""
    for name in (GATEWAY, MODEL):
        for pod in pods(namespace, name):
            shown = kubectl("logs", "-n", namespace, pod["metadata"]["name"], "--tail=5000", check=False).splitlines()
            kept = [line for line in shown if not re.search(r'"(POST /predict|GET /\w+) HTTP/1\.1" 200 ', line)]
            print(f"--- {pod['metadata']['name']}: its last {lines} log lines but 200s ---", *kept[-lines:], sep="\n")


# ---- the tests ----------------------------------------------------------------------------------------------


# First in the module: its manifests keep their own CPU requests (1.5 CPUs of the node's 2), which fit only while no
# other deployment holds the node's CPU, as this module's and the arm64 module's do later in the run.
def test_notebook_06_takes_the_courses_kubernetes_steps(cluster, gateway_image, model_server_image, photo_server,
                                                        reference, tmp_path_factory):  # fmt: skip
    """Notebook 06 top to bottom against this cluster, with the images the suite built: the minimal Deployments and
    Services answer the course's client and the course's request as the in-process model does, then the production
    overlay (kind, with our TensorFlow model server's image), with the manifests' own CPU requests, answers the same;
    and its last cell deletes the namespace."""
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
        overlay="kind",
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
    # Its last cell asked for the deletion (--wait=false, as a learner runs it): the namespace is gone or going.
    namespaces = kubectl_json("get", "namespaces")["items"]
    left = [n["status"]["phase"] for n in namespaces if n["metadata"]["name"] == namespace]
    assert left in ([], ["Terminating"]), left


def test_the_trained_model_answers_every_test_photo_through_the_gateway_service(
    dataset, cluster, gateway_image, trained_litert_image, tmp_path
):
    """The model trained here (notebook 00) in our LiteRT model-server image, k8s/overlays/litert in a namespace of
    its own: through the gateway's Service, on each of the 372 test photos the top class of the model in process,
    and the accuracy notebook 00 reported."""
    images = {"zoomcamp-10-model-server-litert": trained_litert_image, "zoomcamp-10-gateway": gateway_image}
    with deploy(cluster, "litert", images, tmp_path / "overlay") as trained:
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
    check_containers_as_declared(deployed.namespace)


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
        address = kubectl_json("get", "pod", "gateway-one-worker", "-n", namespace)["status"]["podIP"]
        url = f"http://{address}:{contract.GATEWAY_PORT}"
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


def test_a_rolling_update_of_the_gateway_under_keep_alive_load_answers_every_request(deployed):
    """kubectl rollout restart of the gateways while 8 clients post photos through the Service, each on a keep-alive
    connection, which stays with its pod after the pod leaves the Service. Each old gateway:
    - answers requests of that load in its preStop, each answer closing its connection (its drain file), so that
      none of the load's requests sent in the 5 s before its SIGTERM goes to it;
    - answers a slow upload, sent to it once its deletion was seen, that it was still receiving when SIGTERM came;
    - exits 0 on SIGTERM, with no SIGKILL (Docker's record).
    Every request is answered 200."""
    namespace = deployed.namespace
    address = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods(namespace, GATEWAY)}
    before = set(address)
    stops, logs = ContainerStops(namespace, GATEWAY), AccessLogs(namespace, before, GATEWAY)
    load = keep_alive_on_each(deployed, logs, clients=8)
    deletions, slow = Deletions(namespace, GATEWAY), {}

    def upload_through_sigterm(pod: str) -> None:
        # Sent straight to the pod once its deletion is seen, the body taking longer than its 10 s preStop.
        wait_for(lambda: pod in deletions.seen, 180, f"the deletion of {pod}", every=0.05)
        slow[pod] = trickled(f"http://{address[pod]}:{contract.GATEWAY_PORT}/predict", PHOTO, seconds=18)

    uploads = [threading.Thread(target=upload_through_sigterm, args=(pod,)) for pod in before]
    for upload in uploads:
        upload.start()
    restarted = time.monotonic()
    kubectl("rollout", "restart", "-n", namespace, f"deployment/{GATEWAY}")
    rollout(namespace, GATEWAY)
    wait_for(lambda: not before & {p["metadata"]["name"] for p in pods(namespace, GATEWAY)}, 120, "the old pods gone")
    gone = time.monotonic()
    time.sleep(2)
    outcomes = sorted(load.stop(), key=lambda o: o.started)
    for upload in uploads:
        upload.join(timeout=60)
    deletions.stop()
    stopped, answered = stops.stop(), logs.stop()
    sigterm = {pod: stops.first_signal.get(pod, float("inf")) for pod in before}
    sent = {o.request_id: o for o in outcomes}
    drained, late = {}, {}  # each old pod: answers that closed their connection; requests sent in its last 5 s
    for pod in before:
        mine = [sent[rid] for rid in answered[pod] if rid in sent]
        drained[pod] = sum(o.status == 200 and o.closed and o.started < sigterm[pod] for o in mine)
        late[pod] = sum(o.started > sigterm[pod] - 5 for o in mine)
    through = {  # each slow upload: its status, and when it started and ended, from its pod's SIGTERM
        pod: (o.status, round(o.started - sigterm[pod], 1), round(o.ended - sigterm[pod], 1), o.error or o.detail[:40])
        for pod, o in slow.items()
    }
    report = failures_report(outcomes, restarted)
    print(
        f"gateway rollout under keep-alive load: {report}; old pods gone after {gone - restarted:.0f} s; each old "
        f"pod's answers closing their connection before SIGTERM {drained}, requests of the load sent in its last 5 s "
        f"{late}; slow uploads (status, from and to SIGTERM) {through}; stops {stopped}"
    )
    assert outcomes[-1].ended > gone, "the load ended before the rollout did"
    assert all(o.status == 200 for o in outcomes), report
    assert before <= set(stopped), f"Docker recorded no stop of {before - set(stopped)}"
    assert all(stopped[pod] == {"signals": [signal.SIGTERM], "exit_code": 0} for pod in before), stopped
    assert all(drained[pod] for pod in before), f"no answer of the load closed its connection in a preStop: {drained}"
    assert not any(late.values()), f"keep-alive clients still on a stopping pod in its last 5 s before SIGTERM: {late}"
    assert set(slow) == before and all(
        slow[pod].status == 200 and slow[pod].started < sigterm[pod] < slow[pod].ended for pod in before
    ), through


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


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_rollout_of_the_model_tier_under_keep_alive_load_loses_nothing(deployed, replicas):
    """kubectl rollout restart of the model tier while clients post photos through the gateway Service, each on a
    keep-alive connection: every request is answered 200, before, during and after the rollout, and each old model
    server exits 0 on SIGTERM, with no SIGKILL (Docker's record)."""
    namespace = deployed.namespace
    scale(namespace, MODEL, replicas)
    stops = ContainerStops(namespace, MODEL)
    load = keep_alive_load(deployed)
    old = model_pods(namespace)
    restarted = time.monotonic()
    kubectl("rollout", "restart", "-n", namespace, f"deployment/{MODEL}")
    rollout(namespace, MODEL)
    wait_for(lambda: not old & model_pods(namespace), 180, "the old model pods gone")
    gone = time.monotonic()
    time.sleep(3)
    outcomes = sorted(load.stop(), key=lambda o: o.started)
    stopped = stops.stop()
    try:
        report = failures_report(outcomes, restarted)
        print(
            f"model rollout, {replicas} replica(s): {report}; old pods gone after {gone - restarted:.0f} s; {stopped}"
        )
        assert outcomes[-1].ended > gone, "the load ended before the rollout did"
        assert all(o.status == 200 for o in outcomes), report
        assert all(stopped.get(pod) == {"signals": [signal.SIGTERM], "exit_code": 0} for pod in old), stopped
    finally:
        scale(namespace, MODEL, 1)


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


def test_a_hung_gateway_is_taken_out_of_the_service_and_restarted_by_its_liveness_probe(deployed):
    """One gateway's processes all stopped under load (SIGSTOP: it accepts connections and never answers). Its
    readiness probe takes it out of the Service, its liveness probe has the kubelet restart the container, and
    it comes back Ready. Only requests sent to it before it left the Service fail; every later one is answered."""
    namespace = deployed.namespace
    victim = min(pods(namespace, GATEWAY), key=lambda p: p["metadata"]["name"])
    name, address = victim["metadata"]["name"], victim["status"]["podIP"]

    def container() -> tuple[dict, dict]:
        pod = kubectl_json("get", "pod", name, "-n", namespace)
        return pod, pod["status"]["containerStatuses"][0]

    load = Load([f"{deployed.url}/predict"], PHOTO, clients=4, max_requests=100_000, max_seconds=400).start()
    try:
        wait_for(lambda: load.count() >= 20, 60, "the first answers", every=0.1)
        with frozen(namespace, name, "gateway") as processes:
            hung = time.monotonic()
            wait_for(lambda: address not in service_addresses(namespace, GATEWAY), 60, "the hung pod out", 0.2)
            out = time.monotonic()
            wait_for(lambda: container()[1]["restartCount"] >= 1, 180, "the kubelet's restart", 0.5)
            restarted = time.monotonic()
        wait_for(lambda: ready(container()[0]), 120, "the restarted gateway Ready")
        back = time.monotonic()
        time.sleep(2)
    finally:
        outcomes = sorted(load.stop(), key=lambda o: o.started)
    status = container()[1]
    print(f"hung gateway ({processes} processes): out of the Service after {out - hung:.0f} s, restarted after "
          f"{restarted - hung:.0f} s, Ready after {back - hung:.0f} s; {failures_report(outcomes, hung)}")  # fmt: skip
    unhealthy = kubectl_json("get", "events", "-n", namespace, "--field-selector",
                             f"involvedObject.name={name},reason=Unhealthy")["items"]  # fmt: skip
    kubectl("delete", "pod", name, "-n", namespace)  # the tests after this one start with no restart counted
    assert any(e["message"].startswith("Liveness probe failed") for e in unhealthy), [e["message"] for e in unhealthy]
    assert status["lastState"]["terminated"]["exitCode"] == 137, status["lastState"]  # SIGKILL: it could not drain
    failed = [o for o in outcomes if o.status != 200]
    assert all(o.started < out + 1 for o in failed), failures_report(outcomes, hung)  # kube-proxy's sync: 1 s
    assert sum(o.started > out + 1 and o.ended < restarted for o in outcomes) >= 20, "little answered meanwhile"
    assert outcomes[-1].started > back, "the load ended before the gateway was back"


def test_the_kind_overlay_with_tensorflow_serving(cluster, tf_serving_image, gateway_image, reference, tmp_path):
    """Where tensorflow/serving can be pulled: k8s/overlays/kind as it is, TF Serving as the model tier, run by the
    kubelet as declared and answering through the gateway's Service."""
    namespace = unique("zoomcamp-10-tf-serving")
    images = {"zoomcamp-10-model": tf_serving_image, "zoomcamp-10-gateway": gateway_image}
    kubectl("create", "namespace", namespace)
    try:
        kubectl("apply", "-n", namespace, "-f", "-", stdin=render("kind", cluster.minor, images, tmp_path / "overlay"))
        for deployment in (MODEL, GATEWAY):
            rollout(namespace, deployment)
        check_containers_as_declared(namespace)
        service = kubectl_json("get", "service", GATEWAY, "-n", namespace)["spec"]
        status, _, answer = predict(f"http://{service['clusterIP']}:{service['ports'][0]['port']}")
        assert status == 200, answer
        assert np.abs(np.array([answer[c] for c in contract.CLASSES]) - reference).max() <= 1e-4
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)
