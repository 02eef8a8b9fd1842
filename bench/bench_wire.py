"""Wire benchmark: the whole stack with float32 or uint8 images between the tiers.

    python bench/bench_wire.py [--quick]     (or: make bench-wire)

One model server (model_server.py) on the model converted by notebook 01 (the stand-in, or models/clothing-model
after `make model`), which has both signatures, and two gateways on `make serve` defaults in front of it, one
with GATEWAY_WIRE=float32 (the course's tensor to serving_default) and one with GATEWAY_WIRE=uint8 (the pixels to
serving_uint8). For each path:

- the bytes of one image's PredictRequest, as the gateway builds it;
- a closed loop of 8 clients uploading dataset photos (loadtest.py) for 10 s, three rounds, the two paths
  alternating round by round so that the machine's drift hits both alike: requests per second, p50 and p99, and
  the CPU the gateway and the model server each spent per request;
- the network each path needs between the tiers at 500, 1,000 and 2,000 images/s.

The target (issue 13) is a ratio within this run: uint8 throughput at least 1.15x float32's. Writes bench/wire.md
and bench/wire.json. It measures; it never fails on a number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_load import DATASET, gateway_on, measure, serve_defaults
from common import OUTPUT, machine, machine_line, markdown_table, prepare_model, target, targets_table

import gateway
import loadtest
from servers import running_model_server

WIRES = ("float32", "uint8")
CLIENTS = 8
FULL = {"seconds": 10, "rounds": 3, "warmup": 5}
QUICK = {"seconds": 2, "rounds": 1, "warmup": 1}
RATES = (500, 1000, 2000)  # images/s, for the projected network between the tiers


def request_bytes(target: str, wire: str, photo: bytes) -> int:
    """The serialized PredictRequest the gateway sends for one photo on `wire`."""
    client = gateway.ModelClient(gateway.Settings(tf_serving_host=target, wire=wire))
    route = client.route(np.uint8)
    if route.wire != wire:
        raise RuntimeError(f"GATEWAY_WIRE={wire} chose {route.wire}: the model lacks that signature")
    size = client.predict_request(route, gateway.pixels(photo, gateway.Settings())[None]).ByteSize()
    client.close()
    return size


def summarise(runs: list[dict], seconds: float) -> dict:
    latencies = [x for run in runs for x in run["latencies"]]
    answered = sum(run["goodput"] * seconds for run in runs)
    cpu = {part: sum(run["cores"][part] * seconds for run in runs) for part in runs[0]["cores"]}
    return {
        "per_s": statistics.median(run["goodput"] for run in runs),
        "per_s_runs": [run["goodput"] for run in runs],
        "answered": round(answered),
        "errors": sum(run["shed"] + run["no_answer"] + run["other_errors"] for run in runs),
        "p50_ms": loadtest.percentile(latencies, 50) * 1000,
        "p99_ms": loadtest.percentile(latencies, 99) * 1000,
        "cpu_ms_per_request": {part: 1000 * seconds_ / max(answered, 1) for part, seconds_ in cpu.items()},
    }


def report(results: dict) -> str:
    m = results["machine"]
    rows, network = [], []
    for wire in WIRES:
        r = results["paths"][wire]
        cpu = r["cpu_ms_per_request"]
        rows.append(
            [
                wire,
                f"{r['bytes_per_image']:,}",
                f"{r['per_s']:.1f} ({', '.join(f'{x:.1f}' for x in r['per_s_runs'])})",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{cpu['gateway']:.2f}",
                f"{cpu['model server']:.2f}",
                f"{cpu['load generator']:.2f}",
                r["errors"],
            ]
        )
        network.append([wire, *(f"{r['bytes_per_image'] * 8 * rate / 1e9:.2f}" for rate in RATES)])
    f32, u8 = (results["paths"][w] for w in WIRES)

    def saved(part: str) -> str:
        return f"{f32['cpu_ms_per_request'][part] - u8['cpu_ms_per_request'][part]:+.2f}"

    lines = [
        "# Wire benchmark: float32 or uint8 between the tiers",
        "",
        f"Machine: {machine_line(m)}. Load average at start {m['load_average_at_start']}, at end "
        f"{m['load_average_at_end']}.",
        "",
        f"Run: `{results['mode']}` on {m['date']}, {results['duration_s']:.0f} s. Model: {results['model']}. "
        f"One model server and two gateways on `make serve` defaults ({results['defaults']['workers']} workers, "
        f"{results['defaults']['max_inflight']} slots each), one per path; {CLIENTS} closed-loop clients uploading "
        f"{results['photos']} photos, {results['rounds']} rounds of {results['seconds']} s per path, alternating. "
        "Everything shares the same 2 cores, the load generator too.",
        "",
        markdown_table(
            [
                "wire",
                "request bytes / image",
                "requests/s (median; runs)",
                "p50 ms",
                "p99 ms",
                "gateway CPU ms / request",
                "model server CPU ms / request",
                "load generator CPU ms / request",
                "errors",
            ],
            rows,
        ),
        "",
        f"uint8 sends {f32['bytes_per_image'] / u8['bytes_per_image']:.2f}x fewer bytes per image. CPU per request, "
        f"float32 minus uint8: gateway {saved('gateway')} ms, model server {saved('model server')} ms (positive: "
        "uint8 costs less). Errors: requests not answered 200 (shed, no answer, other).",
        "",
        "## The network between the tiers (Gbit/s of requests)",
        "",
        markdown_table(["wire", *(f"{rate:,} images/s" for rate in RATES)], network),
        "",
        "## Targets",
        "",
        targets_table(results["targets"]),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s per path (a smoke run, not numbers)")
    args = parser.parse_args()
    options = QUICK if args.quick else FULL
    started = time.monotonic()
    photos = loadtest.pick_photos(DATASET, 200)
    defaults = serve_defaults()
    results = {"machine": machine(), "mode": "quick" if args.quick else "full", **options, "photos": len(photos)}
    runs = {wire: [] for wire in WIRES}
    with tempfile.TemporaryDirectory(prefix="bench-wire-") as tmp:
        work = Path(tmp)
        model_base, results["model"] = prepare_model(work)
        for wire in WIRES:
            (work / wire).mkdir()
        with (
            running_model_server(model_base, rest_api_port=0) as model,
            gateway_on(model, work / "float32", defaults, GATEWAY_WIRE="float32") as f32,
            gateway_on(model, work / "uint8", defaults, GATEWAY_WIRE="uint8") as u8,
        ):
            stacks = {"float32": f32, "uint8": u8}
            sizes = {wire: request_bytes(model.grpc_target, wire, photos[0].data) for wire in WIRES}
            for wire in WIRES:
                measure(stacks[wire], photos, options["warmup"], clients=CLIENTS)
            for round_ in range(options["rounds"]):
                for wire in WIRES if round_ % 2 == 0 else WIRES[::-1]:
                    runs[wire].append(measure(stacks[wire], photos, options["seconds"], clients=CLIENTS))
                    print(f"  round {round_ + 1}, {wire}: {runs[wire][-1]['goodput']:.1f}/s", flush=True)
    results["defaults"] = defaults
    results["paths"] = {
        wire: {"bytes_per_image": sizes[wire], **summarise(runs[wire], options["seconds"])} for wire in WIRES
    }
    unanswered = [wire for wire in WIRES if not results["paths"][wire]["per_s"]]
    if unanswered:  # no ratio to give: say so instead of dividing by zero
        raise SystemExit(f"bench_wire: no request on the {' or '.join(unanswered)} path answered: {results['paths']}")
    ratio = results["paths"]["uint8"]["per_s"] / results["paths"]["float32"]["per_s"]
    name = f"whole stack at {CLIENTS} clients: uint8 ÷ float32 throughput"
    results["targets"] = [target(name, ratio, "x", 1.15, at_most=False)]
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["duration_s"] = time.monotonic() - started
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "wire.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    (OUTPUT / "wire.md").write_text(text)
    print(text)
    print(f"wrote {OUTPUT / 'wire.md'} and wire.json")


if __name__ == "__main__":
    main()
