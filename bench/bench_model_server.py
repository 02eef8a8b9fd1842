"""Benchmark model_server.py, on TensorFlow and on LiteRT, against calling the same SavedModel in-process.

    make bench-model-server                    # the full run, a few minutes on 2 cores
    python bench/bench_model_server.py --quick # a smoke run of every step, with tiny counts

For two models converted by notebook 01, with the course's signature (input_8 float32[-1,299,299,3] -> dense_7
float32[-1,10]) and the pixel one (serving_uint8: input_8 uint8): the test suite's small stand-in, and an
Xception-size one (keras Xception, random weights, same head). For each, one image per request, as the gateway
sends them:
  - latency: gRPC Predict against the in-process call of the same signature, float32 (the course's client
    path) and uint8, in alternating blocks so that whatever else runs on the machine slows all alike; p50
    and p99. Beside model_server.py, the same requests go to bench/bare_grpc_server.py (sync and asyncio), which
    holds each call as long as the model takes and answers without any work: the floor of what gRPC adds for a
    Python server on this machine. Every gRPC call follows the same two in-process calls: the public signature
    call (the reference) and the direct call model_server.py makes (serving/versions.py);
  - where the float32 request's time goes (each step outside the model timed on its own);
  - throughput: 1, 4, 8 and 16 concurrent clients, without and with --enable_batching (the compose
    model tier's dockerfiles/batching.config unless --batching-config says otherwise), against the
    in-process call on batches of 1 and of 8 images; uint8 requests (the gateway's wire) at 8 clients; and the
    CPU a request costs the bare server and its clients at 8 clients, the floor under batching;
  - TensorFlow or LiteRT: model_server.py --runtime=litert (model.tflite, notebook 01 writes it beside the
    SavedModel) takes every latency and throughput measurement beside the TensorFlow server, in the same
    alternation; LiteRT in-process on batches of 1 and 8; each runtime's time from start to ready as a process, and
    each model-server image's size and time from `docker run` to ready where it is built (--images).
Writes bench/model_server.md and bench/model_server.json. It measures, it does not test: the targets
are reported as met or not met, and nothing fails on them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import psutil
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from common import (
    BENCH,
    OUTPUT,
    ROOT,
    convert_with_notebook_01,
    latency_ms,
    machine,
    machine_line,
    markdown_table,
    target,
    targets_table,
)
from runtimes import image_facts, litert_targets, process_ready_seconds, runtimes_section
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

import protobuf
from contract import INPUT_NAME, MODEL_NAME, OUTPUT_NAME, SIGNATURE_NAME, UINT8_SIGNATURE_NAME
from gateway import scale  # Xception's scaling, as the gateway does it
from servers import CHANNEL_OPTIONS, free_port, running_model_server, terminate
from serving.batching import parse_batching_parameters
from serving.runtime_tensorflow import TensorFlowVersion
from serving.tensors import array_to_tensor_proto

CLIENTS = (1, 4, 8, 16)
# The servers every latency call goes to, in turn: ours on TensorFlow and on LiteRT, and the bare floor in both of
# grpcio's server kinds.
SERVERS = ("model_server", "litert_server", "bare_sync", "bare_asyncio")
# model_server.py's setups in the throughput measurements: TensorFlow and LiteRT, each without and with batching.
OURS = ("plain", "batched", "litert", "litert_batched")
# The model-server images whose size and start --images measures by default: the Makefile's tags.
IMAGES = "zoomcamp-10-model-server:xception-v4-001,zoomcamp-10-model-server-litert:xception-v4-001"


@dataclass(frozen=True)
class Plan:
    latency_calls: int  # interleaved pairs: one in-process call, one gRPC call
    window_seconds: float  # one throughput measurement; calls under way at its end still count
    rounds: int  # every throughput measurement is repeated this often, the rounds interleaved


PLANS = {
    "full": {"standin": Plan(300, 2.0, 3), "xception": Plan(40, 5.0, 2)},
    "quick": {"standin": Plan(10, 0.3, 1), "xception": Plan(2, 1.0, 1)},
}


# name, tests/standin.py's function that saves it as HDF5 for notebook 01
MODELS = {
    "standin": ("stand-in (tests/standin.py)", "save_standin_h5"),
    "xception": ("Xception-size", "save_xception_size_h5"),
}


def course_request(X: np.ndarray) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = SIGNATURE_NAME
    request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(X, shape=X.shape))
    return request


def pixel_request(P: np.ndarray) -> predict_pb2.PredictRequest:
    request = course_request(P)
    request.model_spec.signature_name = UINT8_SIGNATURE_NAME
    return request


def measure_latency(paths: dict, stubs: dict, calls: int, block: int = 25) -> dict:
    """{path: {"public": .., "direct": .., <server>: ..}} latencies for paths {name: (public, direct, request, input)}
    and stubs {server: stub}. Each gRPC call follows the same two in-process calls, the public one (the reference)
    and the direct one (model_server.py's), so every server meets what a client calling about every 6 ms brings.
    The servers and paths take turns in blocks of `block` calls: the machine's load drifts over all alike, and no
    server sits idle while the others are called (a longer idle makes the next call slower: caches and threads go
    cold)."""
    for public, direct, request, value in paths.values():
        for _ in range(3):
            public(value), direct(value)
            for stub in stubs.values():
                stub.Predict(request, timeout=300)
    times = {path: {name: [] for name in ("public", "direct", *stubs)} for path in paths}

    def timed(into: list, call, *args, **kwargs) -> None:
        started = time.perf_counter()
        call(*args, **kwargs)
        into.append(time.perf_counter() - started)

    blocks = math.ceil(calls / block)
    block = math.ceil(calls / blocks)  # `calls` in all, in blocks as even as they come
    for _ in range(blocks):
        for path, (public, direct, request, value) in paths.items():
            for name, stub in stubs.items():
                for _ in range(block):
                    timed(times[path]["public"], public, value)
                    timed(times[path]["direct"], direct, value)
                    timed(times[path][name], stub.Predict, request, timeout=300)
    return {path: {name: latency_ms(t) for name, t in by.items()} for path, by in times.items()}


@contextlib.contextmanager
def running_bare_server(mode: str, hold_ms: float = 0.0):
    """bench/bare_grpc_server.py on a free port; yields what the measurements need (grpc_target, process)."""
    port = free_port()
    command = [sys.executable, str(BENCH / "bare_grpc_server.py"), "--port", str(port), "--mode", mode]
    process = subprocess.Popen([*command, "--hold-ms", f"{hold_ms:.4f}"], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # it prints one line once it listens
        if "gRPC server on" not in line:
            raise RuntimeError(f"bare_grpc_server.py --mode {mode} did not start (exit {process.poll()}): {line!r}")
        yield SimpleNamespace(grpc_target=f"127.0.0.1:{port}", process=process)
    finally:
        terminate(process)


def p50_of_each(steps: dict, calls: int) -> dict:
    """{name: p50 ms} of each step called `calls` times on its own, after three calls to warm it."""
    result = {}
    for name, step in steps.items():
        for _ in range(3):
            step()
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        result[name] = latency_ms(times)["p50"]
    return result


def floors(channel, X: np.ndarray, calls: int) -> dict:
    """p50 ms of what no Predict can go below: one tiny gRPC call through the same server (GetModelStatus: the
    same channel, HTTP/2 exchange, thread pool and servicer, a few bytes each way), and copying the 1 MB."""
    status = model_service_pb2_grpc.ModelServiceStub(channel)
    ask = get_model_status_pb2.GetModelStatusRequest()
    ask.model_spec.name = MODEL_NAME
    steps = {
        "a tiny gRPC call (GetModelStatus)": lambda: status.GetModelStatus(ask, timeout=30),
        "copying the 1 MB tensor once": lambda: X.copy(),
    }
    return p50_of_each(steps, calls)


def where_the_time_goes(in_process, direct, request: predict_pb2.PredictRequest, calls: int) -> dict:
    """p50 ms of each step of a float32 Predict outside the network, each timed on its own as the client and
    model_server.py do it: what is left of the gRPC time is transport, HTTP/2 and the servicer's threads."""
    data = request.SerializeToString()
    steps = {
        "client: encode the request": request.SerializeToString,
        "server: parse the request": lambda: protobuf.PredictRequest.FromString(data),
        "server: tensor_content to numpy": lambda: np.frombuffer(
            parsed.inputs[INPUT_NAME].tensor_content, np.float32
        ).reshape(1, 299, 299, 3),
        "server: numpy to a tensor": lambda: tf.convert_to_tensor(array),
        "the model (in-process public call, the reference)": lambda: in_process(array),
        "the model (model_server.py's direct call)": lambda: direct(array),
        "server: encode the answer": lambda: answer(),
        "client: parse the answer": lambda: predict_pb2.PredictResponse.FromString(answer_bytes),
    }
    parsed = predict_pb2.PredictRequest.FromString(data)
    array = np.frombuffer(parsed.inputs[INPUT_NAME].tensor_content, np.float32).reshape(1, 299, 299, 3)
    logits = in_process(array)

    def answer() -> bytes:
        response = protobuf.PredictResponse()
        response.model_spec.name = MODEL_NAME
        array_to_tensor_proto(logits, response.outputs[OUTPUT_NAME])
        return response.SerializeToString()

    answer_bytes = answer()
    return p50_of_each(steps, calls)


@dataclass
class Window:
    """What one or more throughput measurements of the same setup add up to."""

    seconds: float = 0.0
    items: int = 0  # requests answered, or images classified in-process
    cpu_seconds: float = 0.0  # server and client together; the bench process alone in-process
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        result = {
            "items": self.items,
            "seconds": self.seconds,
            "per_s": self.items / self.seconds,
            "cpu_ms_per_item": 1000 * self.cpu_seconds / max(self.items, 1),
            "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else None,
        }
        if self.latencies:
            result.update({f"{k}_ms": v for k, v in latency_ms(self.latencies).items() if k != "n"})
        return result


def measure_throughput(server, request, clients: int, seconds: float, into: Window) -> None:
    """`clients` threads, each with its own channel, sending one request after another."""
    server_process = psutil.Process(server.process.pid)
    channels = [grpc.insecure_channel(server.grpc_target, options=CHANNEL_OPTIONS) for _ in range(clients)]
    stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in channels]
    for stub in stubs:  # connect and warm every channel before the clock starts
        stub.Predict(request, timeout=300)
    start = threading.Barrier(clients + 1)
    finished: list[float] = []
    lock = threading.Lock()
    deadline = 0.0

    def client(stub) -> None:
        start.wait()
        mine, failed = [], []
        while time.perf_counter() < deadline:
            begun = time.perf_counter()
            try:
                stub.Predict(request, timeout=300)
            except grpc.RpcError as e:
                failed.append(f"{e.code().name}: {e.details()}")
                continue
            mine.append(time.perf_counter() - begun)
        with lock:
            into.latencies.extend(mine)
            into.errors.extend(failed)
            finished.append(time.perf_counter())

    threads = [threading.Thread(target=client, args=(stub,)) for stub in stubs]
    for thread in threads:
        thread.start()
    # CPU time of both sides: the client shares the cores with the server it measures.
    cpu = time.process_time() + sum(server_process.cpu_times()[:2])
    began = time.perf_counter()
    deadline = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    into.cpu_seconds += time.process_time() + sum(server_process.cpu_times()[:2]) - cpu
    into.seconds += max(finished) - began
    into.items = len(into.latencies)
    for channel in channels:
        channel.close()


def measure_in_process(in_process, X: np.ndarray, seconds: float, into: Window) -> None:
    """One caller calling the model in-process for `seconds` (at least once)."""
    in_process(X)
    calls, cpu, started = 0, time.process_time(), time.perf_counter()
    while not calls or time.perf_counter() - started < seconds:
        in_process(X)
        calls += 1
    into.seconds += time.perf_counter() - started
    into.cpu_seconds += time.process_time() - cpu
    into.items += len(X) * calls


def bench_model(key: str, plan: Plan, batching_config: Path, work: Path, log) -> dict:
    title, saver = MODELS[key]
    log(f"{title}: building it, and converting it with notebook 01 (both signatures)")
    (work / key).mkdir(parents=True)
    base = convert_with_notebook_01(work / key, saver)
    loaded = tf.saved_model.load(str(base / "1"))
    function, pixel_function = loaded.signatures[SIGNATURE_NAME], loaded.signatures[UINT8_SIGNATURE_NAME]
    # The model as model_server.py calls it (the direct call of each signature's graph, serving/versions.py).
    served = TensorFlowVersion(1, base / "1")
    served.warm_up()
    # LiteRT in-process, as model_server.py --runtime=litert calls it (serving/runtime_litert.py).
    interpreter = Interpreter(model_path=str(base / "1" / "model.tflite"), num_threads=os.cpu_count())
    litert_runner = interpreter.get_signature_runner(SIGNATURE_NAME)

    def litert_in_process(X):
        return litert_runner(**{INPUT_NAME: X})[OUTPUT_NAME]

    def in_process(X):
        return function(**{INPUT_NAME: X})[OUTPUT_NAME].numpy()

    def in_process_pixels(P):
        return pixel_function(**{INPUT_NAME: P})[OUTPUT_NAME].numpy()

    def direct_call(signature_name: str):
        signature = served.signatures[signature_name]
        return lambda value: served.run(signature, {INPUT_NAME: value})[OUTPUT_NAME]

    direct, direct_pixels = direct_call(SIGNATURE_NAME), direct_call(UINT8_SIGNATURE_NAME)
    P = np.random.default_rng(0).integers(0, 256, (1, 299, 299, 3), np.uint8)
    X = scale(P)
    P8 = np.random.default_rng(8).integers(0, 256, (8, 299, 299, 3), np.uint8)
    X8 = scale(P8)
    request, pixels = course_request(X), pixel_request(P)
    result = {"model": title, "plan": asdict(plan)}
    result["request_bytes"] = {"float32": request.ByteSize(), "uint8": pixels.ByteSize()}
    result["direct_call"] = {name: s.direct is not None for name, s in served.signatures.items()}
    # The bare servers hold each call as long as model_server.py's own model call takes.
    hold_ms = p50_of_each({"direct": lambda: direct(X)}, max(plan.latency_calls // 5, 5))["direct"]
    result["bare_hold_ms"] = hold_ms
    batching = {"enable_batching": True, "batching_parameters_file": batching_config}
    # The servers run side by side (an idle one costs nothing) so that their measurements can alternate: the
    # load of the machine drifts, and alternating spreads the drift over all of them.
    log(f"{title}: time from start to ready, TensorFlow then LiteRT")
    result["ready_s"] = {runtime: process_ready_seconds(base, runtime) for runtime in ("tensorflow", "litert")}
    with (
        running_model_server(base, rest_api_port=0) as plain,
        running_model_server(base, rest_api_port=0, **batching) as batched,
        running_model_server(base, runtime="litert", rest_api_port=0) as litert,
        running_model_server(base, runtime="litert", rest_api_port=0, **batching) as litert_batched,
        running_bare_server("sync", hold_ms) as bare_sync,
        running_bare_server("asyncio", hold_ms) as bare_asyncio,
        running_bare_server("sync") as bare,
        plain.channel() as channel,
    ):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        answer = stub.Predict(request, timeout=300).outputs[OUTPUT_NAME].float_val
        result["max_abs_difference"] = float(np.abs(np.array(answer) - in_process(X).ravel()).max())
        answer = stub.Predict(pixels, timeout=300).outputs[OUTPUT_NAME].float_val
        result["uint8_max_abs_difference"] = float(np.abs(np.array(answer) - in_process(X).ravel()).max())
        litert_channel = litert.channel()
        litert_stub = prediction_service_pb2_grpc.PredictionServiceStub(litert_channel)
        result["litert_max_abs_difference"] = {
            wire: float(
                np.abs(
                    np.array(litert_stub.Predict(r, timeout=300).outputs[OUTPUT_NAME].float_val) - in_process(X).ravel()
                ).max()
            )
            for wire, r in (("float32", request), ("uint8", pixels))
        }
        log(f"{title}: latency, {plan.latency_calls} interleaved calls of each path and server")
        paths = {
            "float32": (in_process, direct, request, X),
            "uint8": (in_process_pixels, direct_pixels, pixels, P),
        }
        with contextlib.ExitStack() as channels:
            stubs = {"model_server": stub, "litert_server": litert_stub}
            for name, server in (("bare_sync", bare_sync), ("bare_asyncio", bare_asyncio)):
                bare_channel = channels.enter_context(grpc.insecure_channel(server.grpc_target, CHANNEL_OPTIONS))
                stubs[name] = prediction_service_pb2_grpc.PredictionServiceStub(bare_channel)
            result["latency"] = measure_latency(paths, stubs, plan.latency_calls)
        result["steps_ms"] = where_the_time_goes(in_process, direct, request, plan.latency_calls)
        result["floor_ms"] = floors(channel, X, plan.latency_calls)

        windows = {name: Window() for name in ("batch1", "batch8", "batch8_uint8", "litert_batch1", "litert_batch8")}
        windows.update({(name, c): Window() for name in OURS for c in CLIENTS})
        windows.update({(name, "uint8"): Window() for name in (*OURS, "bare")})
        windows["bare", "float32"] = Window()
        for round_ in range(plan.rounds):
            log(f"{title}: throughput, round {round_ + 1} of {plan.rounds}")
            measure_in_process(in_process, X, plan.window_seconds, windows["batch1"])
            measure_in_process(in_process, X8, plan.window_seconds, windows["batch8"])
            measure_in_process(in_process_pixels, P8, plan.window_seconds, windows["batch8_uint8"])
            measure_in_process(litert_in_process, X, plan.window_seconds, windows["litert_batch1"])
            measure_in_process(litert_in_process, X8, plan.window_seconds, windows["litert_batch8"])
            servers = tuple(zip(OURS, (plain, batched, litert, litert_batched), strict=True))
            for clients in CLIENTS:
                for name, server in servers if round_ % 2 == 0 else reversed(servers):
                    measure_throughput(server, request, clients, plan.window_seconds, windows[name, clients])
            # At 8 clients: pixels through both of ours, and both wires through the bare server (its CPU per request).
            for name, server in (*servers, ("bare", bare)):
                measure_throughput(server, pixels, 8, plan.window_seconds, windows[name, "uint8"])
            measure_throughput(bare, request, 8, plan.window_seconds, windows["bare", "float32"])
        litert_channel.close()
    for name in OURS:
        windows[name, "float32"] = windows[name, 8]
    for name in ("batch1", "batch8", "batch8_uint8", "litert_batch1", "litert_batch8"):
        result[f"in_process_{name}"] = windows[name].summary()
    result["without_batching"] = [{"clients": c, **windows["plain", c].summary()} for c in CLIENTS]
    result["with_batching"] = [{"clients": c, **windows["batched", c].summary()} for c in CLIENTS]
    result["litert_without_batching"] = [{"clients": c, **windows["litert", c].summary()} for c in CLIENTS]
    result["litert_with_batching"] = [{"clients": c, **windows["litert_batched", c].summary()} for c in CLIENTS]
    result["at_8_clients"] = {
        wire: {name: windows[name, wire].summary() for name in (*OURS, "bare")} for wire in ("float32", "uint8")
    }
    return result


def added_ms(r: dict, wire: str) -> float:
    """What gRPC adds to the in-process public call, p50 (the issue's measure)."""
    latency = r["latency"][wire]
    return latency["model_server"]["p50"] - latency["public"]["p50"]


def parts_of_added(r: dict, wire: str) -> dict:
    """What gRPC adds, part by part (ms, p50): the model call (model_server.py's direct call against the public
    one), grpcio itself (the bare sync server beyond its hold), and the rest: the servicer's own work (parsing,
    checks, tensors, the answer) and what a real model costs in a server process that the bare one's busy hold does
    not (TensorFlow's threads waking up after the idle between calls). The lowest any servicer could reach is the
    first two together: grpcio's floor plus the model call."""
    latency, hold = r["latency"][wire], r["bare_hold_ms"]
    model_call = latency["direct"]["p50"] - latency["public"]["p50"]
    grpcio = latency["bare_sync"]["p50"] - hold
    rest = added_ms(r, wire) - model_call - grpcio
    return {
        "gRPC adds": added_ms(r, wire),
        "the model call: direct instead of public": model_call,
        "grpcio, sync server (the bare one beyond its hold)": grpcio,
        "grpcio, asyncio server (the bare one beyond its hold)": latency["bare_asyncio"]["p50"] - hold,
        "the rest: model_server.py's own work, its threads and TensorFlow's waking after an idle": rest,
        "**the lowest a sync Python server can add: grpcio + the model call**": grpcio + model_call,
    }


def batching_ceiling(r: dict, wire: str, cores: int) -> dict:
    """The most images/s batching at 8 clients could reach if the servicer cost nothing: every image costs the
    model's in-process batch-8 CPU plus what the bare server and its clients spend on one request."""
    batch8 = r["in_process_batch8" if wire == "float32" else "in_process_batch8_uint8"]
    bare = r["at_8_clients"][wire]["bare"]["cpu_ms_per_item"]
    ceiling = 1000 * cores / (batch8["cpu_ms_per_item"] + bare)
    return {"bare_cpu_ms": bare, "images_per_s": ceiling, "ratio": ceiling / batch8["per_s"]}


def evaluate(results: dict, images: list[dict]) -> list[dict]:
    """The issues' targets, as measured / required (common.target)."""
    targets = litert_targets(results, images)
    if "xception" in results:
        latency = results["xception"]["latency"]["float32"]
        ratio = latency["model_server"]["p50"] / latency["public"]["p50"]
        targets.append(target("Xception-size: gRPC p50 / in-process p50", ratio, "x", 1.05, at_most=True))
    if "standin" in results:
        r = results["standin"]
        targets.append(target("stand-in, float32: gRPC p50 - in-process p50", added_ms(r, "float32"), "ms", 1.5, True))
        targets.append(target("stand-in, uint8: gRPC p50 - in-process p50", added_ms(r, "uint8"), "ms", 0.75, True))
    for r in results.values():
        for wire, batch8 in (("float32", "in_process_batch8"), ("uint8", "in_process_batch8_uint8")):
            rate = r["at_8_clients"][wire]["batched"]["per_s"]
            name = f"{r['model']}, {wire}: batching at 8 clients / in-process batch-8 throughput"
            targets.append(target(name, rate / r[batch8]["per_s"], "x", 0.9, at_most=False))
    return targets


def markdown(report: dict) -> str:
    m = report["machine"]
    results = report["results"].values()
    latency_rows = []
    for r in results:
        for wire in ("float32", "uint8"):
            latency = r["latency"][wire]
            latency_rows.append(
                [
                    r["model"],
                    wire,
                    f"{r['request_bytes'][wire]:,}",
                    latency["model_server"]["n"],
                    f"{latency['public']['p50']:.2f}",
                    f"{latency['direct']['p50']:.2f}",
                    f"{latency['model_server']['p50']:.2f}",
                    f"{latency['model_server']['p99']:.2f}",
                    f"**{added_ms(r, wire):+.2f}**",
                    f"{latency['bare_sync']['p50']:.2f}",
                    f"{latency['bare_asyncio']['p50']:.2f}",
                ]
            )
    part_rows = [
        [r["model"], name] + [f"{parts_of_added(r, wire)[name]:+.2f}" for wire in ("float32", "uint8")]
        for r in results
        for name in parts_of_added(r, "float32")
    ]
    step_rows = []
    for r in results:
        outside = sum(v for k, v in r["steps_ms"].items() if "the model" not in k)
        for name, ms in r["steps_ms"].items():
            step_rows.append([r["model"], name, f"{ms:.3f}"])
        step_rows.append([r["model"], "**steps outside the model, together**", f"{outside:.3f}"])
        for name, ms in r["floor_ms"].items():
            step_rows.append([r["model"], f"floor: {name}", f"{ms:.3f}"])

    def rate(run: dict) -> str:
        errors = f", {run['errors']} errors: {run['first_error']}" if run["errors"] else ""
        return f"{run['per_s']:.1f} ({run['items']}{errors})"

    throughput_rows = []
    for r in results:
        for name in ("batch1", "batch8", "batch8_uint8"):
            run = r[f"in_process_{name}"]
            label = {"batch1": "batch 1", "batch8": "batch 8", "batch8_uint8": "batch 8, uint8 signature"}[name]
            throughput_rows.append(
                [r["model"], f"in-process, {label}", rate(run), "", f"{run['cpu_ms_per_item']:.1f}", "", "", ""]
            )
        by_clients = zip(r["without_batching"], r["with_batching"], strict=True)
        pairs = [(f"{plain['clients']} clients, float32", plain, batched) for plain, batched in by_clients]
        uint8 = r["at_8_clients"]["uint8"]
        pairs.append(("8 clients, uint8", uint8["plain"], uint8["batched"]))
        for label, plain, batched in pairs:
            cells = [f"{run[key]:.1f}" for run in (plain, batched) for key in ("p50_ms", "cpu_ms_per_item")]
            throughput_rows.append([r["model"], label, rate(plain), *cells[:2], rate(batched), *cells[2:]])
    ceiling_rows = []
    for r in results:
        for wire, batch8 in (("float32", "in_process_batch8"), ("uint8", "in_process_batch8_uint8")):
            ceiling = batching_ceiling(r, wire, m["cores"])
            measured = r["at_8_clients"][wire]["batched"]["per_s"]
            ceiling_rows.append(
                [
                    r["model"],
                    wire,
                    f"{r[batch8]['per_s']:.1f}",
                    f"{r[batch8]['cpu_ms_per_item']:.2f}",
                    f"{ceiling['bare_cpu_ms']:.2f}",
                    f"{ceiling['images_per_s']:.1f} ({ceiling['ratio']:.2f}x)",
                    f"{measured:.1f} ({measured / r[batch8]['per_s']:.2f}x)",
                ]
            )
    differences = ", ".join(f"{r['max_abs_difference']:.1e} ({r['model']})" for r in results)
    uint8 = ", ".join(f"{r['uint8_max_abs_difference']:.1e} ({r['model']})" for r in results)
    rounds = ", ".join(f"{r['plan']['rounds']} x {r['plan']['window_seconds']:g} s ({r['model']})" for r in results)
    holds = ", ".join(f"{r['bare_hold_ms']:.2f} ms ({r['model']})" for r in results)
    direct = "; ".join(
        f"{r['model']}: "
        + ", ".join(f"{name} {'direct' if used else 'public'}" for name, used in r["direct_call"].items())
        for r in results
    )
    lines = [
        "# model_server.py benchmark",
        "",
        f"Machine: {machine_line(m)}. Load average at start {m['load_average_at_start']}, at end "
        f"{m['load_average_at_end']}: other work on the machine shares these cores.",
        "",
        f"Run: `{report['mode']}` on {m['date']}, {report['duration_s']:.0f} s. One image (1x299x299x3, float32 "
        "or uint8) per request, sent by this script on the same cores as the servers. Batching: "
        f"`{report['batching_config']}` ({report['batching_parameters']}).",
        "",
        "## Latency (ms, one image per request, in-process and gRPC calls interleaved in blocks)",
        "",
        markdown_table(
            [
                "model",
                "wire",
                "request bytes",
                "calls",
                "in-process p50 (public call)",
                "in-process p50 (direct call)",
                "gRPC p50",
                "gRPC p99",
                "gRPC adds (p50)",
                "bare sync server p50",
                "bare asyncio server p50",
            ],
            latency_rows,
        ),
        "",
        "In-process: the signature called as any TensorFlow program calls it (the public call, the reference), and "
        f"the direct call of its graph that model_server.py makes ({direct}). The bare servers "
        "(bench/bare_grpc_server.py) take the same requests and answer the same size of answer without doing "
        f"anything, after holding each call as long as model_server.py's model call takes ({holds}).",
        "",
        "## What gRPC adds, part by part (p50 ms)",
        "",
        markdown_table(["model", "part", "float32", "uint8"], part_rows),
        "",
        "grpcio's part is what the bare server adds beyond its hold: HTTP/2 and the loopback for the request's bytes "
        "both ways, the server's threads (or event loop) waking up after the wait, the client's call. No servicer "
        "written in Python can go below it; the asyncio server is not below the sync one here. The last row is "
        "therefore the lowest 'gRPC adds' a Python server calling the model this way can reach on this machine: "
        "where it is above a target, the target is out of reach for model_server.py.",
        "",
        "## Where a float32 request's time goes (p50 ms of each step, timed alone)",
        "",
        markdown_table(["model", "step", "p50 ms"], step_rows),
        "",
        "The steps are the ones the client and model_server.py take, run one at a time in this process. The floors: "
        "a tiny call through the same server pays the fixed part of a call (one HTTP/2 exchange, gRPC's thread pool, "
        "the servicer, the GIL) without the bytes; a memcpy of the 1 MB is what the bytes cost at the least.",
        "",
        "## Throughput (one image per request)",
        "",
        markdown_table(
            [
                "model",
                "callers",
                "without batching: images/s (count)",
                "p50 ms",
                "CPU ms/image",
                "with batching: images/s (count)",
                "p50 ms",
                "CPU ms/image",
            ],
            throughput_rows,
        ),
        "",
        f"Each row adds up {rounds}; the rows' measurements alternate, so a change in the machine's load "
        "hits all of them alike. CPU ms/image: CPU time of the server and of the client (this script) per "
        "request, or of the in-process caller per image: what a request costs, whatever else shares the "
        f"machine. Answers equal the in-process call to {differences}; through the uint8 signature to {uint8}.",
        "",
        "## The ceiling of batching through gRPC at 8 clients",
        "",
        markdown_table(
            [
                "model",
                "wire",
                "in-process batch 8: images/s",
                "its CPU ms/image",
                "bare server + clients: CPU ms/request",
                "ceiling: images/s (÷ in-process)",
                "measured with batching (÷ in-process)",
            ],
            ceiling_rows,
        ),
        "",
        f"On {m['cores']} cores shared by the server and its clients, an image sent through gRPC costs at least the "
        "model's CPU per image in an in-process batch of 8 plus what grpcio spends on one request on both sides "
        "(the bare server at 8 clients). The ceiling is the cores divided by that sum: the throughput batching "
        "would reach if model_server.py's own work cost nothing.",
        "",
        *runtimes_section(report),
        "## Targets",
        "",
        targets_table(report["targets"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks that every step runs")
    parser.add_argument("--models", default="standin,xception", help="comma-separated: standin, xception")
    parser.add_argument("--batching-config", type=Path, default=ROOT / "dockerfiles" / "batching.config")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT)
    parser.add_argument(
        "--images",
        default=IMAGES,
        help="comma-separated model-server images to size and start (built by `make build MODEL_SERVER=local` and "
        "`MODEL_SERVER=litert`); empty: none (%(default)s)",
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = set(keys) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}: choose from {sorted(MODELS)}")
    if not args.batching_config.is_file():
        parser.error(f"no batching config at {args.batching_config}")

    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    report = {
        "mode": mode,
        "machine": machine(),
        "batching_config": str(args.batching_config),
    }
    report["batching_parameters"] = str(parse_batching_parameters(args.batching_config.read_text()))
    with tempfile.TemporaryDirectory(prefix="bench-model-server-") as work:
        report["results"] = {k: bench_model(k, PLANS[mode][k], args.batching_config, Path(work), log) for k in keys}
    log(f"images: size and time to ready of {args.images or 'none'}")
    report["images"] = [image_facts(image) for image in filter(None, args.images.split(","))]
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["duration_s"] = time.monotonic() - started
    report["targets"] = evaluate(report["results"], report["images"])

    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "model_server.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.output_dir / "model_server.md").write_text(text)
    print(text)
    log(f"wrote {args.output_dir / 'model_server.md'} and model_server.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
