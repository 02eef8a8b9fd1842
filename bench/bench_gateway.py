"""Gateway benchmark: what the gateway adds over a direct Predict call, against the course's approach.

    python bench/bench_gateway.py [--quick] [--skip-install-size]     (or: make bench-gateway)

In one run, against one local model server (model_server.py) and one local photo host:
- direct Predict with the tensor already in hand (the gateway's own ModelClient: protobuf.py + grpc);
- our gateway under gunicorn, sent {"url": ...} for dataset photos and for 12-megapixel JPEGs (the
  photos scaled up to 4000x3000 and saved at quality 90, made in a temporary folder for the run);
  end-to-end latency, latency added over direct Predict, CPU time of the gunicorn worker per request;
- the same with JPEG draft mode off, on the 12-megapixel JPEGs;
- the course's approach (bench/course_gateway.py) under the same gunicorn settings, same inputs;
- draft mode against a full decode on the 12-megapixel JPEGs: preprocessing time, tensor difference,
  and top-1 agreement of the served model;
- the installed size of Pipfile.lock's `default` section alone, in a throwaway venv (needs PyPI);
- `import gateway` in a fresh interpreter.

Writes bench/gateway.md and bench/gateway.json and prints the markdown. It measures; it never fails
on a time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import psutil
import requests
from common import (
    BENCH,
    OUTPUT,
    ROOT,
    latency_ms,
    machine,
    machine_line,
    markdown_table,
    prepare_model,
    target,
    targets_table,
)
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import gateway
from contract import CLASSES, INPUT_NAME, OUTPUT_NAME
from gateway_parts import images
from gateways import running_gateway
from servers import running_model_server

DATASET = Path(os.environ.get("CLOTHING_DATASET", ROOT.parent / "shared" / "data" / "clothing-dataset-small"))
BIG = (4000, 3000)  # a 12-megapixel camera photo; portrait photos become 3000x4000
BIG_QUALITY = 90
WORKERS = 1  # the same gunicorn settings for both gateways
# The course's gateway is a WSGI app: gunicorn serves it with threads (ours is ASGI, on gunicorn.conf.py's worker).
COURSE_WORKER = ("--worker-class", "gthread", "--threads", "8")
STAGES = ("fetch", "preprocess", "predict", "total")  # the gateway's gateway_stage_seconds labels
WARMUP = 5  # requests before measuring: first Predict traces the model, first fetch warms caches

FULL = {"photo_requests": 200, "big_n": 100, "big_requests": 60, "import_repeats": 5}
QUICK = {"photo_requests": 40, "big_n": 16, "big_requests": 16, "import_repeats": 3}


def pick_photos(n: int) -> list[Path]:
    """n photos of the dataset's test split, taken in turn from each class so every class is in."""
    by_class = [sorted((DATASET / "test" / name).glob("*.jpg")) for name in CLASSES]
    picked = [photos[i] for i in range(max(map(len, by_class))) for photos in by_class if i < len(photos)]
    if not picked:
        sys.exit(f"no photos under {DATASET}/test: set CLOTHING_DATASET to the clothing-dataset-small folder")
    return picked[:n]


def make_site(photos: list[Path], site: Path, big_n: int) -> tuple[list[str], list[str]]:
    """The photos as they are and scaled up to 12 megapixels, as files under `site`; their paths there."""
    (site / "photos").mkdir(parents=True)
    (site / "big").mkdir()
    small, big = [], []
    for i, photo in enumerate(photos):
        shutil.copyfile(photo, site / "photos" / f"{i}.jpg")
        small.append(f"photos/{i}.jpg")
    for i, photo in enumerate(photos[:big_n]):
        with Image.open(photo) as image:
            rgb = image.convert("RGB")
        size = BIG if rgb.width >= rgb.height else BIG[::-1]
        rgb.resize(size, Image.BICUBIC).save(site / "big" / f"{i}.jpg", quality=BIG_QUALITY)
        big.append(f"big/{i}.jpg")
    return small, big


@contextlib.contextmanager
def photo_host(site: Path):
    """`site` over HTTP on 127.0.0.1, standing in for a stranger's image host."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def worker_cpu_seconds(master: subprocess.Popen) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in psutil.Process(master.pid).children(recursive=True))


def worker_rss_mb(master: subprocess.Popen) -> float:
    return sum(p.memory_info().rss for p in psutil.Process(master.pid).children(recursive=True)) / 1e6


def stage_seconds(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) per stage of our gateway's gateway_stage_seconds histogram, from /metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("gateway_stage_seconds_sum", "gateway_stage_seconds_count"):
                totals.setdefault(sample.labels["stage"], [0.0, 0.0])[sample.name.endswith("_count")] = sample.value
    return {stage: (total, count) for stage, (total, count) in totals.items()}


@dataclass
class Gateway:
    url: str
    master: subprocess.Popen  # gunicorn's master; its children are the workers
    has_metrics: bool  # ours serves /metrics with per-stage times; the course's approach does not


def measure(client: gateway.ModelClient, tensors: list[np.ndarray], gateways: dict[str, Gateway], image_urls, count):
    """`count` rounds, one request at a time; each round takes the next image and sends it to direct
    Predict and to every gateway, in a rotating order, so a change in the machine's load hits all alike."""
    sessions = {name: requests.Session() for name in gateways}

    def direct(i):
        client.predict(tensors[i][None])

    def via(name):
        def ask(i):
            response = sessions[name].post(f"{gateways[name].url}/predict", json={"url": image_urls[i]}, timeout=120)
            response.raise_for_status()
            answers[name][image_urls[i]] = [response.json()[c] for c in CLASSES]

        return ask

    paths = {"direct": direct, **{name: via(name) for name in gateways}}
    answers = {name: {} for name in gateways}
    for i in range(min(WARMUP, len(image_urls))):
        for call in paths.values():
            call(i)
    cpu = {name: worker_cpu_seconds(g.master) for name, g in gateways.items()}
    stages = {name: stage_seconds(g.url) for name, g in gateways.items() if g.has_metrics}
    seconds = {name: [] for name in paths}
    names = list(paths)
    for r in range(count):
        i = r % len(image_urls)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            paths[name](i)
            seconds[name].append(time.perf_counter() - started)
    figures = {"direct": latency_ms(seconds["direct"])}
    for name, g in gateways.items():
        figures[name] = {
            **latency_ms(seconds[name]),
            "cpu_ms": (worker_cpu_seconds(g.master) - cpu[name]) / count * 1000,
            "rss_mb": worker_rss_mb(g.master),
        }
        if name in stages:
            after = stage_seconds(g.url)
            figures[name]["stages_mean_ms"] = {
                stage: (total - stages[name][stage][0]) / (n - stages[name][stage][1]) * 1000
                for stage, (total, n) in after.items()
            }
    for session in sessions.values():
        session.close()
    return figures, answers


def logits_of(client: gateway.ModelClient, tensors: list[np.ndarray], batch: int = 16) -> np.ndarray:
    return np.concatenate(
        [client.predict(np.stack(tensors[i : i + batch])).logits for i in range(0, len(tensors), batch)]
    )


# Draft to 2x the target is the gateway's setting; 1x (JPEG scale 1/8 on these photos) is measured beside it.
DRAFT_FACTORS = (2, 1)


def draft_study(client: gateway.ModelClient, big_files: list[Path]) -> dict:
    """Full decode against draft decode on the same 12-megapixel JPEGs, in this process."""
    full_settings, draft_settings = gateway.Settings(jpeg_draft=False), gateway.Settings(jpeg_draft=True)
    timings = {"full": [], **{factor: [] for factor in DRAFT_FACTORS}}
    tensors = {name: [] for name in timings}
    for path in big_files:
        data = path.read_bytes()
        for name in timings:
            # The gateway's own factor, swapped only for the time of the call, measures the alternative.
            factor = images.DRAFT_FACTOR if name == "full" else name
            with mock.patch.object(images, "DRAFT_FACTOR", factor):
                started = time.perf_counter()
                tensor = gateway.preprocess(data, full_settings if name == "full" else draft_settings)
                timings[name].append(time.perf_counter() - started)
            tensors[name].append(tensor)
    full = np.stack(tensors["full"])
    full_logits = logits_of(client, tensors["full"])
    margins = np.sort(full_logits, axis=1)
    variants = {}
    for factor in DRAFT_FACTORS:
        difference = np.abs(full - np.stack(tensors[factor]))
        logits = logits_of(client, tensors[factor])
        variants[f"{factor}x"] = {
            "preprocess_ms": latency_ms(timings[factor]),
            "tensor_mean_abs_diff": float(difference.mean()),
            "tensor_max_abs_diff": float(difference.max()),
            "top1_agreement": float((full_logits.argmax(axis=1) == logits.argmax(axis=1)).mean()),
            "logit_max_abs_diff": float(np.abs(full_logits - logits).max()),
        }
    return {
        "n": len(big_files),
        "full_preprocess_ms": latency_ms(timings["full"]),
        "gateway_factor": f"{images.DRAFT_FACTOR}x",
        "variants": variants,
        "distinct_top1_classes": len(set(full_logits.argmax(axis=1).tolist())),
        "top1_margin_median": float(np.median(margins[:, -1] - margins[:, -2])),
    }


def import_seconds(module: str, repeats: int, extra_path: Path | None = None) -> float:
    """Median wall time of `import module` in fresh interpreters (interpreter start-up not counted)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if extra_path:
        env["PYTHONPATH"] = str(extra_path)
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(repeats)
    ]
    return statistics.median(runs)


def install_size(work: Path) -> dict:
    """Pipfile.lock's `default` section (the gateway's runtime) pip-installed into an empty venv; its size."""
    lock = json.loads((ROOT / "Pipfile.lock").read_text())["default"]
    pins = [
        f"{name}{spec['version']}" + (f"; {spec['markers']}" if spec.get("markers") else "")
        for name, spec in lock.items()
    ]
    venv = work / "runtime-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    try:
        # --no-deps: the lock already lists every dependency, so exactly the locked set goes in.
        pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "--disable-pip-version-check"]
        subprocess.run([*pip, "install", "--quiet", "--no-deps", *pins], check=True, timeout=900)
        site = next(venv.glob("lib/python*/site-packages"))
        entries = {entry.name: _disk_bytes(entry) for entry in site.iterdir()}
        largest = sorted(entries.items(), key=lambda item: -item[1])[:6]
        return {
            "packages": len(pins),
            "mb": _disk_bytes(site) / 1e6,
            "largest": [{"entry": name, "mb": size / 1e6} for name, size in largest],
        }
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def _disk_bytes(path: Path) -> int:
    """What `du` counts: allocated blocks, each file once."""
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def max_answer_difference(ours: dict, theirs: dict) -> float:
    return max(float(np.abs(np.subtract(ours[url], theirs[url])).max()) for url in ours.keys() & theirs.keys())


def run(options: dict, skip_install_size: bool) -> dict:
    photos = pick_photos(max(options["photo_requests"], options["big_n"]))
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        work = Path(tmp)
        print(f"making {options['big_n']} JPEGs of 12 megapixels and the model ...", flush=True)
        small, big = make_site(photos, work / "site", options["big_n"])
        model_base, model_note = prepare_model(work)
        results = {"model": model_note, "photo_count": len(small), "big_count": len(big)}
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(running_model_server(model_base, rest_api_port=0))
            host = stack.enter_context(photo_host(work / "site"))
            client = gateway.ModelClient(
                gateway.Settings(tf_serving_host=server.grpc_target, input_name=INPUT_NAME, output_name=OUTPUT_NAME)
            )
            print("draft mode against full decode ...", flush=True)
            results["draft"] = draft_study(client, [work / "site" / p for p in big])
            print("starting the gateways ...", flush=True)
            gateways = {}
            for name, env in (("ours", {}), ("ours_no_draft", {"GATEWAY_JPEG_DRAFT": "0"})):
                gw = stack.enter_context(
                    running_gateway(server.grpc_target, work, workers=WORKERS, FETCH_ALLOW_HOSTS="127.0.0.1", **env)
                )
                gateways[name] = Gateway(gw.url, gw.process, has_metrics=True)
            # The course's approach, under the same gunicorn settings; its worker imports all of TensorFlow.
            course = stack.enter_context(
                running_gateway(
                    server.grpc_target,
                    work,
                    workers=WORKERS,
                    gunicorn_args=COURSE_WORKER,
                    startup_timeout=120,
                    app="course_gateway:app",
                    pythonpath="bench",
                    TF_CPP_MIN_LOG_LEVEL="2",
                )
            )
            gateways["course"] = Gateway(course.url, course.process, has_metrics=False)
            # Draft mode changes nothing below 598 pixels a side, so "draft off" is measured on the big JPEGs only.
            sets = {
                "photos": (
                    small,
                    options["photo_requests"],
                    {k: v for k, v in gateways.items() if k != "ours_no_draft"},
                ),
                "big": (big[: options["big_requests"]], options["big_requests"], gateways),
            }
            settings = gateway.Settings()
            answers = {}
            for name, (paths, count, targets) in sets.items():
                print(f"measuring {name}: {count} rounds ...", flush=True)
                tensors = [gateway.preprocess((work / "site" / p).read_bytes(), settings) for p in paths]
                urls = [f"{host}/{p}" for p in paths]
                results[name], answers[name] = measure(client, tensors, targets, urls, count)
        results["answers_max_abs_diff_photos"] = max_answer_difference(
            answers["photos"]["ours"], answers["photos"]["course"]
        )
        print("import time ...", flush=True)
        results["import_gateway_s"] = import_seconds("gateway", options["import_repeats"])
        results["import_course_s"] = import_seconds("course_gateway", 1, BENCH)
        if not skip_install_size:
            print("installing [packages] into a throwaway venv ...", flush=True)
            results["install"] = install_size(work)
    return results


def targets_of(results: dict) -> list[dict]:
    photos, big = results["photos"], results["big"]
    added_photos = photos["ours"]["p50"] - photos["direct"]["p50"]
    speedup = (big["course"]["p50"] - big["direct"]["p50"]) / (big["ours"]["p50"] - big["direct"]["p50"])
    found = [
        target("added p50 latency, dataset photos", added_photos, "ms", 10, at_most=True),
        target("faster than the course's approach at 4000x3000 (added p50)", speedup, "x", 3, at_most=False),
    ]
    if "install" in results:
        found.append(target("runtime install ([packages] alone)", results["install"]["mb"], "MB", 150, at_most=True))
    found.append(target("`import gateway`", results["import_gateway_s"], "s", 0.5, at_most=True))
    return found


def recommendation(draft: dict) -> tuple[bool, str]:
    """Whether to keep jpeg_draft on, by top-1 agreement of the gateway's draft factor, and why."""
    chosen = draft["variants"][draft["gateway_factor"]]
    speedup = draft["full_preprocess_ms"]["p50"] / chosen["preprocess_ms"]["p50"]
    if chosen["top1_agreement"] == 1.0:
        return True, (
            f"keep `jpeg_draft=True` (the default): the same top-1 as a full decode on all {draft['n']} JPEGs, "
            f"{speedup:.1f}x faster preprocessing"
        )
    return False, (
        f"turn `jpeg_draft` off: top-1 differed from a full decode on {1 - chosen['top1_agreement']:.1%} of "
        f"{draft['n']} JPEGs, for {speedup:.1f}x faster preprocessing"
    )


def report(m: dict, options: dict, results: dict, targets: list[dict]) -> str:
    draft = results["draft"]
    sets = {"photos": "dataset photos (400 px wide)", "big": "4000x3000 JPEGs, q90"}
    who = {"ours": "our gateway", "ours_no_draft": "our gateway, draft off", "course": "course's approach"}
    rows, stage_rows = [], []
    for name, label in sets.items():
        d = results[name]["direct"]
        rows.append(
            ["direct Predict (tensor in hand)", label, d["n"], f"{d['p50']:.1f}", f"{d['p99']:.1f}", "", "", ""]
        )
        for key, g in results[name].items():
            if key == "direct":
                continue
            added = f"{g['p50'] - d['p50']:.1f}"
            rows.append(
                [
                    who[key],
                    label,
                    g["n"],
                    f"{g['p50']:.1f}",
                    f"{g['p99']:.1f}",
                    added,
                    f"{g['cpu_ms']:.1f}",
                    f"{g['rss_mb']:.0f}",
                ]
            )
            if "stages_mean_ms" in g:
                stages = g["stages_mean_ms"]
                stage_rows.append(
                    [who[key], label, *(f"{stages.get(s, float('nan')):.1f}" for s in STAGES), f"{g['p50']:.1f}"]
                )
    headers = [
        "path",
        "inputs",
        "requests",
        "p50 ms",
        "p99 ms",
        "added p50 ms",
        "worker CPU ms/request",
        "worker RSS MB",
    ]
    latency = markdown_table(headers, rows)
    stage_table = markdown_table(["gateway", "inputs", *(f"{s} mean ms" for s in STAGES), "client p50 ms"], stage_rows)
    ours_big, course_big = results["big"]["ours"], results["big"]["course"]
    comparison = markdown_table(
        ["4000x3000, course ÷ ours", "ratio"],
        [
            ["added p50 latency (the target's measure)", f"{targets[1]['measured']:.1f}x"],
            ["end-to-end p50 latency", f"{course_big['p50'] / ours_big['p50']:.1f}x"],
            ["worker CPU per request", f"{course_big['cpu_ms'] / ours_big['cpu_ms']:.1f}x"],
        ],
    )
    draft_rows = [["full decode", f"{draft['full_preprocess_ms']['p50']:.1f}", "", "", "", ""]]
    for name, v in draft["variants"].items():
        label = f"draft to {name} the target" + (" (the gateway's)" if name == draft["gateway_factor"] else "")
        draft_rows.append(
            [
                label,
                f"{v['preprocess_ms']['p50']:.1f}",
                f"{v['tensor_mean_abs_diff']:.4f}",
                f"{v['tensor_max_abs_diff']:.3f}",
                f"{v['top1_agreement']:.1%}",
                f"{v['logit_max_abs_diff']:.4f}",
            ]
        )
    draft_table = markdown_table(
        [
            "decode",
            "preprocess p50 ms",
            "mean \\|Δ\\| tensor vs full",
            "max \\|Δ\\| tensor",
            "top-1 agreement with full",
            "max \\|Δ\\| logit",
        ],
        draft_rows,
    )
    lines = [
        "# Gateway benchmark",
        "",
        f"Machine: {machine_line(m)}.",
        "",
        f"Model: {results['model']}. Model tier: model_server.py on 127.0.0.1 (gRPC, no batching). Photos: "
        f"{results['photo_count']} from the dataset's test split (every class), served by a local threaded HTTP "
        "server; "
        f"{results['big_count']} of them scaled up (bicubic) to 4000x3000 or 3000x4000 and saved as JPEG q90. "
        f"Both gateways run under gunicorn with gunicorn.conf.py, {WORKERS} worker: ours its uvicorn worker, the "
        f"course's Flask app (WSGI) `{' '.join(COURSE_WORKER)}`; "
        "requests go one at a time after "
        f"{WARMUP} warm-up requests. \"Added\" is the gateway's p50 minus direct Predict's p50 on the same images. "
        "CPU is the gunicorn worker's user+system time (psutil) over the measured requests. "
        "The model server, gateway, photo host and client share the machine's cores.",
        "",
        f"Run {m['date']} ({'--quick' if options is QUICK else 'full'}). Load average (1 min) at the start and end: "
        f"{m['load_average_at_start'][0]:.1f} / {m['load_average_at_end'][0]:.1f}: other work on the machine "
        "shares its cores and slows wall-clock figures more than CPU-time ones.",
        "",
        "## Latency and CPU",
        "",
        latency,
        "",
        "Where our gateway's time goes (its own per-stage histogram, read from /metrics around the measured "
        "requests): means, so the slow outliers the p99 column shows weigh in; the client's figure adds HTTP, "
        "Flask and JSON.",
        "",
        stage_table,
        "",
        "Our answers and the course's on the dataset photos differ by at most "
        f"{results['answers_max_abs_diff_photos']:.2g} (same preprocessing).",
        "",
        "## 4000x3000: our gateway against the course's approach",
        "",
        comparison,
        "",
        "## JPEG draft mode against a full decode (4000x3000 JPEGs, in-process `gateway.preprocess`)",
        "",
        draft_table,
        "",
        f"On {draft['n']} JPEGs. Tensors are in [-1, 1]: one grey level is 0.0078. The model's top-1 over these "
        f"JPEGs took {draft['distinct_top1_classes']} distinct classes; its median margin between the first and "
        f"second logit is {draft['top1_margin_median']:.4f}.",
        "",
        f"The top-1 figure comes from {results['model'].split(' (')[0]}. "
        + (
            "It has random weights: its answers hinge on small logit differences, so top-1 agreement here is weak "
            "evidence; the tensor difference is the model-independent measure. The course model is not reachable "
            "here; run `make model` and this benchmark again to measure agreement on it. "
            if "stand-in" in results["model"]
            else ""
        )
        + "The 4000x3000 JPEGs are upscaled 400-pixel photos, smoother than real camera photos.",
        "",
        f"Recommended default by this measurement: {recommendation(draft)[1]}.",
        "",
    ]
    if "install" in results:
        install = results["install"]
        largest = ", ".join(f"{e['entry']} {e['mb']:.1f}" for e in install["largest"])
        lines += [
            "## Runtime install size",
            "",
            f"Pipfile.lock `default` ({install['packages']} pinned packages, no dependencies added) pip-installed into "
            f"an empty venv: site-packages takes **{install['mb']:.1f} MB** on disk (du, with bytecode). "
            f"Largest entries (MB): {largest}.",
            "",
        ]
    else:
        lines += ["## Runtime install size", "", "Not measured (--skip-install-size).", ""]
    lines += [
        "## Import time",
        "",
        f"`import gateway` in a fresh interpreter: median of {options['import_repeats']} runs "
        f"**{results['import_gateway_s']:.2f} s**; the course's gateway module (TensorFlow and "
        f"tensorflow-serving-api): {results['import_course_s']:.2f} s (one run).",
        "",
        "## Targets",
        "",
        targets_table(targets),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer photos and requests (about a minute)")
    parser.add_argument("--skip-install-size", action="store_true", help="do not pip-install [packages] (needs PyPI)")
    args = parser.parse_args()
    options = QUICK if args.quick else FULL
    m = machine()
    started = time.monotonic()
    results = run(options, args.skip_install_size)
    m["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    targets = targets_of(results)
    markdown = report(m, options, results, targets)
    document = {
        "benchmark": "gateway",
        "mode": "quick" if args.quick else "full",
        "machine": m,
        "options": options,
        "seconds": round(time.monotonic() - started),
        "results": results,
        "recommended_jpeg_draft": recommendation(results["draft"])[0],
        "targets": targets,
    }
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "gateway.json").write_text(json.dumps(document, indent=2) + "\n")
    (OUTPUT / "gateway.md").write_text(markdown)
    print(markdown)
    print(f"wrote {OUTPUT / 'gateway.md'} and gateway.json in {document['seconds']} s")


if __name__ == "__main__":
    main()
