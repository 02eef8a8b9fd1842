"""Benchmark model_server.py against calling the same SavedModel in-process.

    make bench-model-server                    # the full run, a few minutes on 2 cores
    python bench/bench_model_server.py --quick # a smoke run of every step, with tiny counts

For two models converted by notebook 01, with the course's signature (input_8 float32[-1,299,299,3] -> dense_7
float32[-1,10]) and the pixel one (serving_uint8: input_8 uint8): the test suite's small stand-in, and an
Xception-size one (keras Xception, random weights, same head). For each, one image per request, as the gateway
sends them:
  - latency: gRPC Predict against the in-process call of the same signature, float32 (the course's client
    path) and uint8, interleaved call by call so that whatever else runs on the machine slows all alike; p50
    and p99; and where the float32 request's time goes (each step outside the model timed on its own);
  - throughput: 1, 4, 8 and 16 concurrent clients, without and with --enable_batching (the compose
    model tier's dockerfiles/batching.config unless --batching-config says otherwise), against the
    in-process call on batches of 1 and of 8 images.
Writes bench/model_server.md and bench/model_server.json. It measures, it does not test: the targets
are reported as met or not met, and nothing fails on them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
import tensorflow as tf
from common import (
    BENCH,
    ROOT,
    convert_with_notebook_01,
    latency_ms,
    machine,
    machine_line,
    markdown_table,
    target,
    targets_table,
)
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from contract import INPUT_NAME, MODEL_NAME, OUTPUT_NAME, SIGNATURE_NAME, UINT8_SIGNATURE_NAME
from gateway import scale  # Xception's scaling, as the gateway does it
from servers import CHANNEL_OPTIONS, running_model_server
from serving.batching import parse_batching_parameters
from serving.predict import array_to_tensor_proto

CLIENTS = (1, 4, 8, 16)


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


def measure_latency(stub, paths: dict, calls: int) -> dict:
    """{path: (in-process latency, gRPC latency)} for paths {name: (in_process, request, input)}: every call of
    every path interleaved with the others, so the machine's load drifts over all alike."""
    for in_process, request, value in paths.values():
        for _ in range(3):
            in_process(value)
            stub.Predict(request, timeout=300)
    times = {name: ([], []) for name in paths}
    for _ in range(calls):
        for name, (in_process, request, value) in paths.items():
            local, remote = times[name]
            started = time.perf_counter()
            in_process(value)
            local.append(time.perf_counter() - started)
            started = time.perf_counter()
            stub.Predict(request, timeout=300)
            remote.append(time.perf_counter() - started)
    return {name: (latency_ms(local), latency_ms(remote)) for name, (local, remote) in times.items()}


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


def where_the_time_goes(in_process, request: predict_pb2.PredictRequest, calls: int) -> dict:
    """p50 ms of each step of a float32 Predict outside the network, each timed on its own as the client and
    model_server.py do it: what is left of the gRPC time is transport, HTTP/2 and the servicer's threads."""
    data = request.SerializeToString()
    steps = {
        "client: encode the request": request.SerializeToString,
        "server: parse the request": lambda: predict_pb2.PredictRequest.FromString(data),
        "server: tensor_content to numpy": lambda: np.frombuffer(
            parsed.inputs[INPUT_NAME].tensor_content, np.float32
        ).reshape(1, 299, 299, 3),
        "server: numpy to a tensor": lambda: tf.convert_to_tensor(array),
        "server: the model (in-process call)": lambda: in_process(array),
        "server: encode the answer": lambda: answer(),
        "client: parse the answer": lambda: predict_pb2.PredictResponse.FromString(answer_bytes),
    }
    parsed = predict_pb2.PredictRequest.FromString(data)
    array = np.frombuffer(parsed.inputs[INPUT_NAME].tensor_content, np.float32).reshape(1, 299, 299, 3)
    logits = in_process(array)

    def answer() -> bytes:
        response = predict_pb2.PredictResponse()
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

    def in_process(X):
        return function(**{INPUT_NAME: X})[OUTPUT_NAME].numpy()

    def in_process_pixels(P):
        return pixel_function(**{INPUT_NAME: P})[OUTPUT_NAME].numpy()

    P = np.random.default_rng(0).integers(0, 256, (1, 299, 299, 3), np.uint8)
    X = scale(P)
    X8 = scale(np.random.default_rng(8).integers(0, 256, (8, 299, 299, 3), np.uint8))
    request = course_request(X)
    result = {"model": title, "plan": asdict(plan)}
    result["request_bytes"] = {"float32": request.ByteSize(), "uint8": pixel_request(P).ByteSize()}
    batching = {"enable_batching": True, "batching_parameters_file": batching_config}
    # Both servers run side by side (the idle one costs nothing) so that their measurements can
    # alternate: the load of the machine drifts, and alternating spreads the drift over both.
    with (
        running_model_server(base, rest_api_port=0) as plain,
        running_model_server(base, rest_api_port=0, **batching) as batched,
        plain.channel() as channel,
    ):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        answer = stub.Predict(request, timeout=300).outputs[OUTPUT_NAME].float_val
        result["max_abs_difference"] = float(np.abs(np.array(answer) - in_process(X).ravel()).max())
        answer = stub.Predict(pixel_request(P), timeout=300).outputs[OUTPUT_NAME].float_val
        result["uint8_max_abs_difference"] = float(np.abs(np.array(answer) - in_process(X).ravel()).max())
        log(f"{title}: latency, {plan.latency_calls} interleaved calls of each path")
        paths = {"float32": (in_process, request, X), "uint8": (in_process_pixels, pixel_request(P), P)}
        latency = measure_latency(stub, paths, plan.latency_calls)
        result["in_process"], result["grpc"] = latency["float32"]
        result["in_process_uint8"], result["grpc_uint8"] = latency["uint8"]
        result["steps_ms"] = where_the_time_goes(in_process, request, plan.latency_calls)
        result["floor_ms"] = floors(channel, X, plan.latency_calls)

        windows = {name: Window() for name in ("batch1", "batch8")}
        windows.update({(name, c): Window() for name in ("plain", "batched") for c in CLIENTS})
        for round_ in range(plan.rounds):
            log(f"{title}: throughput, round {round_ + 1} of {plan.rounds}")
            measure_in_process(in_process, X, plan.window_seconds, windows["batch1"])
            measure_in_process(in_process, X8, plan.window_seconds, windows["batch8"])
            for clients in CLIENTS:
                servers = (("plain", plain), ("batched", batched))
                for name, server in servers if round_ % 2 == 0 else reversed(servers):
                    measure_throughput(server, request, clients, plan.window_seconds, windows[name, clients])
    result["in_process_batch1"] = windows["batch1"].summary()
    result["in_process_batch8"] = windows["batch8"].summary()
    result["without_batching"] = [{"clients": c, **windows["plain", c].summary()} for c in CLIENTS]
    result["with_batching"] = [{"clients": c, **windows["batched", c].summary()} for c in CLIENTS]
    return result


def evaluate(results: dict) -> list[dict]:
    """The issue's targets, as measured / required (common.target)."""
    targets = []
    if "xception" in results:
        r = results["xception"]
        ratio = r["grpc"]["p50"] / r["in_process"]["p50"]
        targets.append(target("Xception-size: gRPC p50 / in-process p50", ratio, "x", 1.05, at_most=True))
    if "standin" in results:
        r = results["standin"]
        added = r["grpc"]["p50"] - r["in_process"]["p50"]
        targets.append(target("stand-in, float32: gRPC p50 - in-process p50", added, "ms", 1.5, at_most=True))
        added = r["grpc_uint8"]["p50"] - r["in_process_uint8"]["p50"]
        targets.append(target("stand-in, uint8: gRPC p50 - in-process p50", added, "ms", 0.75, at_most=True))
    for r in results.values():
        rate = next(t["per_s"] for t in r["with_batching"] if t["clients"] == 8)
        name = f"{r['model']}: batching at 8 clients / in-process batch-8 throughput"
        targets.append(target(name, rate / r["in_process_batch8"]["per_s"], "x", 0.9, at_most=False))
    return targets


def overhead_note(results: dict) -> str:
    """Why batching can or cannot catch up with an in-process batch: what each request costs on top."""
    parts = []
    for r in results.values():
        batched = next(t for t in r["with_batching"] if t["clients"] == 8)
        extra = batched["cpu_ms_per_item"] - r["in_process_batch8"]["cpu_ms_per_item"]
        parts.append(
            f"{r['model']}: {batched['cpu_ms_per_item']:.1f} ms of CPU per request at 8 clients with batching "
            f"against {r['in_process_batch8']['cpu_ms_per_item']:.1f} ms per image in an in-process batch of 8 "
            f"({extra:+.1f} ms)"
        )
    return (
        "What a request costs beyond the model (CPU of client and server together: the 1 MB tensor through "
        "Python gRPC both ways, the handler, the batching) is not removed by batching; where it is as large "
        "as the model's own cost per image, batching through the server cannot reach the in-process batch. "
        + "; ".join(parts)
        + "."
    )


def markdown(report: dict) -> str:
    m = report["machine"]
    results = report["results"].values()
    latency_rows = [
        [
            r["model"],
            path,
            f"{r['request_bytes'][path]:,}",
            r[local]["n"],
            f"{r[local]['p50']:.2f}",
            f"{r[local]['p99']:.2f}",
            f"{r[remote]['p50']:.2f}",
            f"{r[remote]['p99']:.2f}",
            f"{r[remote]['p50'] - r[local]['p50']:+.2f}",
            f"{r[remote]['p50'] / r[local]['p50']:.3f}",
        ]
        for r in results
        for path, local, remote in (("float32", "in_process", "grpc"), ("uint8", "in_process_uint8", "grpc_uint8"))
    ]
    step_rows = []
    for r in results:
        outside = sum(v for k, v in r["steps_ms"].items() if "the model" not in k)
        for name, ms in r["steps_ms"].items():
            step_rows.append([r["model"], name, f"{ms:.3f}"])
        step_rows.append([r["model"], "**steps outside the model, together**", f"{outside:.3f}"])
        added = r["grpc"]["p50"] - r["in_process"]["p50"]
        step_rows.append(
            [r["model"], "**the rest of what gRPC adds: transport, HTTP/2, threads**", f"{added - outside:.3f}"]
        )
        for name, ms in r["floor_ms"].items():
            step_rows.append([r["model"], f"floor: {name}", f"{ms:.3f}"])

    def rate(run: dict) -> str:
        errors = f", {run['errors']} errors: {run['first_error']}" if run["errors"] else ""
        return f"{run['per_s']:.1f} ({run['items']}{errors})"

    throughput_rows = []
    for r in results:
        one, eight = r["in_process_batch1"], r["in_process_batch8"]
        throughput_rows.append(
            [r["model"], "in-process, batch 1", rate(one), "", f"{one['cpu_ms_per_item']:.1f}", "", "", ""]
        )
        throughput_rows.append(
            [r["model"], "in-process, batch 8", rate(eight), "", f"{eight['cpu_ms_per_item']:.1f}", "", "", ""]
        )
        for plain, batched in zip(r["without_batching"], r["with_batching"], strict=True):
            throughput_rows.append(
                [
                    r["model"],
                    f"{plain['clients']} clients",
                    rate(plain),
                    f"{plain['p50_ms']:.1f}",
                    f"{plain['cpu_ms_per_item']:.1f}",
                    rate(batched),
                    f"{batched['p50_ms']:.1f}",
                    f"{batched['cpu_ms_per_item']:.1f}",
                ]
            )
    differences = ", ".join(f"{r['max_abs_difference']:.1e} ({r['model']})" for r in results)
    uint8 = ", ".join(f"{r['uint8_max_abs_difference']:.1e} ({r['model']})" for r in results)
    rounds = ", ".join(f"{r['plan']['rounds']} x {r['plan']['window_seconds']:g} s ({r['model']})" for r in results)
    lines = [
        "# model_server.py benchmark",
        "",
        f"Machine: {machine_line(m)}. Load average at start {m['load_average_at_start']}, at end "
        f"{m['load_average_at_end']}: other work on the machine shares these cores.",
        "",
        f"Run: `{report['mode']}` on {m['date']}, {report['duration_s']:.0f} s. One image (1x299x299x3, float32 "
        "or uint8) per request, sent by this script on the same cores as the server. Batching: "
        f"`{report['batching_config']}` ({report['batching_parameters']}).",
        "",
        "## Latency (ms, one image per request, in-process and gRPC calls interleaved)",
        "",
        markdown_table(
            [
                "model",
                "wire",
                "request bytes",
                "calls",
                "in-process p50",
                "p99",
                "gRPC p50",
                "p99",
                "gRPC adds (p50)",
                "ratio (p50)",
            ],
            latency_rows,
        ),
        "",
        "## Where a float32 request's time goes (p50 ms of each step, timed alone)",
        "",
        markdown_table(["model", "step", "p50 ms"], step_rows),
        "",
        "The steps are the ones the client and model_server.py take, run one at a time in this process; what the "
        "gRPC call adds beyond them is the transport itself (the 1 MB through the loopback and HTTP/2 framing, "
        "in chunks, both ways) and the hand-offs between gRPC's threads and the servicer. The floors: a tiny call "
        "through the same server pays the fixed part of that (one HTTP/2 exchange, gRPC's thread pool, the servicer, "
        "the GIL) without the bytes; a memcpy of the 1 MB is what the bytes cost at the least.",
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
        "## Targets",
        "",
        targets_table(report["targets"]),
        "",
        overhead_note(report["results"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks that every step runs")
    parser.add_argument("--models", default="standin,xception", help="comma-separated: standin, xception")
    parser.add_argument("--batching-config", type=Path, default=ROOT / "dockerfiles" / "batching.config")
    parser.add_argument("--output-dir", type=Path, default=BENCH)
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
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["duration_s"] = time.monotonic() - started
    report["targets"] = evaluate(report["results"])

    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "model_server.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.output_dir / "model_server.md").write_text(text)
    print(text)
    log(f"wrote {args.output_dir / 'model_server.md'} and model_server.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
