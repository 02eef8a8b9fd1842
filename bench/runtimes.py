"""TensorFlow or LiteRT: bench_model_server.py's comparison of model_server.py's two runtimes. Their servers take the
same requests in the same run (bench_model_server.py measures them); here are the ratios and targets drawn from that,
how soon each answers after it starts, as a process and as an image, how big each image is, and the report's section.

Ready means what the gateway and the image's HEALTHCHECK wait for: gRPC health SERVING and the REST status saying
AVAILABLE. Times are from the moment the process (or `docker run`) is started, polled every 20 ms.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import shutil
import subprocess
import time

import grpc
import requests
from common import markdown_table, target
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contract import GRPC_PORT, MODEL_NAME, REST_PORT
from servers import running_model_server

POLL_SECONDS = 0.02


def _ready(grpc_target: str, rest_url: str) -> bool:
    try:
        with grpc.insecure_channel(grpc_target) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            return False
        return "AVAILABLE" in requests.get(f"{rest_url}/v1/models/{MODEL_NAME}", timeout=1).text
    except (grpc.RpcError, requests.RequestException):
        return False


def process_ready_seconds(base, runtime: str) -> float:
    """model_server.py --runtime=<runtime> from its start to ready (LiteRT's where TensorFlow cannot be imported)."""
    started = time.monotonic()
    with running_model_server(base, runtime=runtime, startup_timeout=300, wait_serving=False) as server:
        while not _ready(server.grpc_target, server.rest_url):
            time.sleep(POLL_SECONDS)
        return time.monotonic() - started


def _started_at(container: str) -> float:
    """When the container's process started (the engine's clock, this machine's), as a Unix time."""
    inspect = subprocess.run(["docker", "inspect", "--format", "{{.State.StartedAt}}", container], capture_output=True)
    stamp = inspect.stdout.decode().strip()  # RFC 3339 with nanoseconds, in UTC
    seconds, _, fraction = stamp.rstrip("Z").partition(".")
    parsed = datetime.datetime.fromisoformat(seconds).replace(tzinfo=datetime.UTC)
    return parsed.timestamp() + float(f"0.{fraction or 0}")


def image_facts(image: str, timeout: float = 300) -> dict:
    """An image's size (MB, as `docker image ls` counts it), its time from `docker run` to ready, and from its
    process's start to ready; or why not."""
    if not shutil.which("docker"):
        return {"image": image, "missing": "no docker command"}
    inspect = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True, check=False)
    if inspect.returncode != 0:
        return {"image": image, "missing": "not built (`make build MODEL_SERVER=...`)"}
    (config,) = json.loads(inspect.stdout)
    environment = dict(item.split("=", 1) for item in config["Config"]["Env"] or [])
    facts = {
        "image": image,
        "runtime": environment.get("MODEL_RUNTIME", "tensorflow"),
        "size_mb": config["Size"] / 1e6,
        "architecture": config["Architecture"],
    }
    publish = ["-p", f"127.0.0.1::{GRPC_PORT}", "-p", f"127.0.0.1::{REST_PORT}"]
    started = time.monotonic()
    run = subprocess.run(["docker", "run", "-d", "--rm", *publish, image], capture_output=True, text=True, check=True)
    container = run.stdout.strip()
    try:
        ports = {}
        for port in (GRPC_PORT, REST_PORT):
            mapped = subprocess.run(["docker", "port", container, str(port)], capture_output=True, text=True)
            ports[port] = mapped.stdout.split()[0].rsplit(":", 1)[1]
        grpc_target, rest_url = f"127.0.0.1:{ports[GRPC_PORT]}", f"http://127.0.0.1:{ports[REST_PORT]}"
        while not _ready(grpc_target, rest_url):
            if time.monotonic() - started > timeout:
                return {**facts, "missing": f"not ready within {timeout:.0f} s"}
            time.sleep(POLL_SECONDS)
        facts["ready_s"] = time.monotonic() - started
        facts["process_ready_s"] = time.time() - _started_at(container)
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run(["docker", "rm", "-f", container], capture_output=True, timeout=60)
    return facts


def runtime_ratios(r: dict, wire: str) -> dict:
    """LiteRT's server against TensorFlow's on the same requests in the same run: p50 at 1 client, and images/s at 8
    clients with batching."""
    latency, at_8 = r["latency"][wire], r["at_8_clients"][wire]
    return {
        "p50": latency["litert_server"]["p50"] / latency["model_server"]["p50"],
        "throughput": at_8["litert_batched"]["per_s"] / at_8["batched"]["per_s"],
    }


def litert_targets(results: dict, images: list[dict]) -> list[dict]:
    """Issue 28's targets: LiteRT's server against TensorFlow's, its start, its image."""
    targets = []
    for r in results.values():
        for wire in ("float32", "uint8"):
            ratios = runtime_ratios(r, wire)
            name = f"{r['model']}, {wire}: LiteRT server p50 / TensorFlow server p50, 1 client"
            targets.append(target(name, ratios["p50"], "x", 0.8, at_most=True))
            name = f"{r['model']}, {wire}: LiteRT / TensorFlow server images/s, 8 clients, batching"
            targets.append(target(name, ratios["throughput"], "x", 1.25, at_most=False))
        name = f"{r['model']}: LiteRT server, start to ready (process)"
        targets.append(target(name, r["ready_s"]["litert"], "s", 2.0, at_most=True))
    for facts in images:
        if facts.get("runtime") == "litert" and "missing" not in facts:
            name = f"{facts['image']} (LiteRT)"
            targets.append(target(f"{name}: size", facts["size_mb"], "MB", 350, at_most=True))
            targets.append(target(f"{name}: process start to ready", facts["process_ready_s"], "s", 2.0, at_most=True))
    return targets


def runtimes_section(report: dict) -> list[str]:
    """TensorFlow or LiteRT: the same requests to both servers in one run, their start, their images."""
    results = report["results"].values()
    rows = []
    for r in results:
        for wire in ("float32", "uint8"):
            latency, at_8, ratios = r["latency"][wire], r["at_8_clients"][wire], runtime_ratios(r, wire)
            rows.append(
                [
                    r["model"],
                    wire,
                    f"{latency['model_server']['p50']:.1f}",
                    f"{latency['litert_server']['p50']:.1f}",
                    f"**{ratios['p50']:.2f}x**",
                    f"{at_8['batched']['per_s']:.2f}",
                    f"{at_8['litert_batched']['per_s']:.2f}",
                    f"**{ratios['throughput']:.2f}x**",
                ]
            )
    clients_rows = [
        [r["model"], plain["clients"]] + [f"{run['per_s']:.2f}" for run in (plain, batched, litert, litert_batched)]
        for r in results
        for plain, batched, litert, litert_batched in zip(
            r["without_batching"],
            r["with_batching"],
            r["litert_without_batching"],
            r["litert_with_batching"],
            strict=True,
        )
    ]
    in_process_rows = [
        [r["model"]]
        + [f"{r[f'in_process_{name}']['per_s']:.2f}" for name in ("batch1", "litert_batch1", "batch8", "litert_batch8")]
        for r in results
    ]
    ready_rows = [[r["model"], f"{r['ready_s']['tensorflow']:.2f}", f"{r['ready_s']['litert']:.2f}"] for r in results]
    image_rows = [
        [
            f"`{f['image']}`",
            f.get("runtime", ""),
            f.get("architecture", ""),
            f.get("missing", f"{f.get('size_mb', 0):,.0f} MB"),
            f"{f['ready_s']:.2f} s" if "ready_s" in f else "",
            f"{f['process_ready_s']:.2f} s" if "process_ready_s" in f else "",
        ]
        for f in report["images"]
    ]
    differences = "; ".join(
        f"{r['model']}: " + ", ".join(f"{w} {d:.1e}" for w, d in r["litert_max_abs_difference"].items())
        for r in results
    )
    return [
        "## TensorFlow or LiteRT (the same requests to both servers, in one run)",
        "",
        markdown_table(
            [
                "model",
                "wire",
                "TensorFlow server p50 ms, 1 client",
                "LiteRT server p50 ms",
                "LiteRT ÷ TensorFlow",
                "TensorFlow server images/s, 8 clients, batching",
                "LiteRT server images/s",
                "LiteRT ÷ TensorFlow",
            ],
            rows,
        ),
        "",
        "model_server.py --runtime=litert serves notebook 01's model.tflite, the same model as the SavedModel, with "
        "LiteRT's XNNPACK kernels on all cores, one call at a time. Its latency calls alternate with the TensorFlow "
        "server's (the latency table above); its throughput windows alternate with the TensorFlow server's. LiteRT's "
        f"answers differ from TensorFlow's in-process call by at most {differences}.",
        "",
        markdown_table(
            ["model", "clients", "TensorFlow", "TensorFlow, batching", "LiteRT", "LiteRT, batching"], clients_rows
        ),
        "",
        "Images/s with one image per request, float32.",
        "",
        markdown_table(
            ["model", "TensorFlow batch 1", "LiteRT batch 1", "TensorFlow batch 8", "LiteRT batch 8"], in_process_rows
        ),
        "",
        "In process, images/s: the public signature call and LiteRT's signature runner, one caller.",
        "",
        markdown_table(["model", "TensorFlow: start to ready, s", "LiteRT: start to ready, s"], ready_rows),
        "",
        "From the process's start (model_server.py, LiteRT's where TensorFlow cannot be imported) to gRPC health "
        "SERVING and REST AVAILABLE, on this machine's Python environment.",
        "",
        *(
            [
                markdown_table(
                    ["image", "runtime", "architecture", "size", "docker run to ready", "process start to ready"],
                    image_rows,
                ),
                "",
                "Each image as built by `make build`, with the model it was built with; its size as `docker image ls` "
                "counts it, and its time to ready from `docker run` (the engine's own work included) and from its "
                "process's start (the engine's StartedAt).",
                "",
            ]
            if image_rows
            else []
        ),
    ]
