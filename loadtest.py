"""Load generator for the clothing gateway: a fixed number of requests with photos from the dataset.

    make load-test URL=http://localhost:9696 REQUESTS=500 CONCURRENCY=8
    python loadtest.py --url http://localhost:9696 --requests 500 --concurrency 8

Works against any gateway URL: local gunicorn, `make compose-up`, or a Kubernetes port-forward
(`kubectl port-forward svc/gateway 9696:80`); run it while `kubectl get hpa -w` shows the autoscaler react.
CONCURRENCY workers each send one request at a time (a closed loop), cycling through a seeded mix of
photos from every split and class of the dataset folder, until REQUESTS have been sent. A progress line
shows the rate and errors as it goes; the summary gives throughput, p50/p95/p99 latency of the
successful requests, and errors by HTTP status and the gateway's error code.

Photos are uploaded by default, since a gateway elsewhere cannot fetch files from this machine.
`--send url` sends {"url": …} instead: with `--photo-base-url` pointing at a copy of the dataset folder
the gateway can reach, or else this script serves the folder itself on `--serve-host` (then the gateway
must be allowed to fetch from it, e.g. FETCH_ALLOW_HOSTS=127.0.0.1 for a local gateway).

Exit status: 0 when every request got a 2xx, 1 otherwise, 2 for bad arguments. Needs only the standard
library and requests.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import http.server
import json
import math
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import requests

from contract import GATEWAY_PORT

ROOT = Path(__file__).resolve().parent
DEFAULT_DATASET = Path(os.environ.get("CLOTHING_DATASET", ROOT.parent / "shared" / "data" / "clothing-dataset-small"))


@dataclass(frozen=True)
class Photo:
    name: str  # path relative to the dataset folder
    data: bytes


@dataclass(frozen=True)
class Outcome:
    status: int | None  # None: no HTTP answer (refused, reset, timed out)
    seconds: float
    error: str = ""  # the gateway's error code, or the exception's name when there was no answer


def pick_photos(dataset: Path, count: int, seed: int = 1) -> list[Photo]:
    """`count` photos spread over every split and class folder, read into memory once."""
    folders = sorted({p.parent for p in dataset.rglob("*.jpg")})
    if not folders:
        raise FileNotFoundError(f"no .jpg photos under {dataset} (set --dataset or CLOTHING_DATASET)")
    rng = random.Random(seed)  # noqa: S311 (a reproducible mix of photos, not a secret)
    pools = [sorted(folder.glob("*.jpg")) for folder in folders]
    for pool in pools:
        rng.shuffle(pool)
    # Round-robin over the folders, so even a small count mixes classes and splits.
    chosen = []
    while len(chosen) < count and any(pools):
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(pool.pop())
    rng.shuffle(chosen)
    return [Photo(p.relative_to(dataset).as_posix(), p.read_bytes()) for p in chosen]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Summary:
    outcomes: list[Outcome]
    seconds: float  # wall time of the whole run
    requested: int = 0

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is not None and 200 <= o.status < 300]

    @property
    def errors(self) -> collections.Counter:
        """Failed requests by "status code" (e.g. "503 overloaded") or "no answer (ExceptionName)"."""
        counts = collections.Counter()
        for o in self.outcomes:
            if o.status is None:
                counts[f"no answer ({o.error})"] += 1
            elif not 200 <= o.status < 300:
                counts[f"{o.status} {o.error}".strip()] += 1
        return counts

    def as_dict(self) -> dict:
        latencies = [o.seconds for o in self.ok]
        by_status = collections.Counter(str(o.status) if o.status is not None else "none" for o in self.outcomes)
        return {
            "requested": self.requested,
            "sent": len(self.outcomes),
            "ok": len(latencies),
            "seconds": round(self.seconds, 3),
            "throughput_rps": round(len(latencies) / self.seconds, 2) if self.seconds else 0.0,
            "latency_ms": {
                name: round(value * 1000, 1)
                for name, value in [
                    ("p50", percentile(latencies, 50)),
                    ("p95", percentile(latencies, 95)),
                    ("p99", percentile(latencies, 99)),
                    ("mean", sum(latencies) / len(latencies) if latencies else math.nan),
                    ("max", max(latencies, default=math.nan)),
                ]
            },
            "status_counts": dict(sorted(by_status.items())),
            "errors": dict(self.errors.most_common()),
        }

    def report(self) -> str:
        d = self.as_dict()
        ms = d["latency_ms"]
        lines = [
            f"requests    {d['sent']} sent of {d['requested']}, {d['ok']} ok, {d['sent'] - d['ok']} failed "
            f"in {d['seconds']:.1f} s",
            f"throughput  {d['throughput_rps']:.1f} successful requests/s",
            f"latency     p50 {ms['p50']:.0f} ms   p95 {ms['p95']:.0f} ms   p99 {ms['p99']:.0f} ms   "
            f"(mean {ms['mean']:.0f}, max {ms['max']:.0f}; successful requests)",
        ]
        if d["errors"]:
            lines.append("errors      " + "\n            ".join(f"{n:>5} × {k}" for k, n in d["errors"].items()))
        else:
            lines.append("errors      none")
        return "\n".join(lines)


class Progress:
    """One line that rewrites itself on a terminal, or a line per tenth of the budget elsewhere (CI logs)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self._shown = (0, -1)  # (tenth, done) of the last line written when not on a terminal

    def show(self, outcomes: list[Outcome], started: float, final: bool = False) -> None:
        done = len(outcomes)
        tenth = done * 10 // max(self.total, 1)
        if not self.tty:
            if (tenth <= self._shown[0] and not final) or done == self._shown[1]:
                return
            self._shown = (tenth, done)
        elapsed = max(time.monotonic() - started, 1e-9)
        failed = sum(1 for o in outcomes if o.status is None or not 200 <= o.status < 300)
        recent = [o.seconds for o in outcomes[-200:] if o.status is not None and 200 <= o.status < 300]
        text = (
            f"{done:>6}/{self.total} {100 * done / max(self.total, 1):3.0f}%  {done / elapsed:7.1f} req/s  "
            f"errors {failed:<5} p50 {percentile(recent, 50) * 1000:5.0f} ms (last 200)"
        )
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _send(session: requests.Session, predict_url: str, photo: Photo, photo_base_url: str, timeout: float) -> Outcome:
    started = time.perf_counter()
    try:
        if photo_base_url:
            response = session.post(predict_url, json={"url": photo_base_url + quote(photo.name)}, timeout=timeout)
        else:
            files = {"image": (Path(photo.name).name, photo.data, "image/jpeg")}
            response = session.post(predict_url, files=files, timeout=timeout)
    except requests.RequestException as error:
        return Outcome(None, time.perf_counter() - started, type(error).__name__)
    seconds = time.perf_counter() - started
    code = ""
    if not response.ok:
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = response.reason or ""  # not the gateway's JSON: a proxy or ingress answered
    return Outcome(response.status_code, seconds, code)


def run(
    url: str,
    photos: list[Photo],
    requests_total: int,
    concurrency: int,
    *,
    photo_base_url: str = "",
    timeout: float = 30.0,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> Summary:
    """Send `requests_total` POST /predict requests from `concurrency` threads; upload photos unless
    `photo_base_url` is given (then send {"url": photo_base_url + name}). `stop` ends it early."""
    predict_url = url.rstrip("/") + "/predict"
    stop = stop or threading.Event()
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    issued = 0

    def worker():
        nonlocal issued
        with requests.Session() as session:  # one keep-alive connection per worker, as a client would hold
            while not stop.is_set():
                with lock:
                    if issued >= requests_total:
                        return
                    index, issued = issued, issued + 1
                outcome = _send(session, predict_url, photos[index % len(photos)], photo_base_url, timeout)
                with lock:
                    outcomes.append(outcome)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        while alive := [t for t in threads if t.is_alive()]:
            alive[0].join(0.25)  # a short join keeps the main thread free to take Ctrl-C
            if progress:
                with lock:
                    snapshot = list(outcomes)
                progress.show(snapshot, started)
    except KeyboardInterrupt:
        stop.set()
        for thread in threads:
            thread.join(timeout + 1)
    summary = Summary(list(outcomes), time.monotonic() - started, requests_total)
    if progress:
        progress.show(summary.outcomes, started, final=True)
    return summary


@contextlib.contextmanager
def serving_folder(folder: Path, host: str):
    """The dataset folder over HTTP on `host` (a free port), for --send url without --photo-base-url."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((host, 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Send a fixed number of photo requests to a clothing gateway and summarise the answers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--url", default=f"http://localhost:{GATEWAY_PORT}", help="the gateway's base URL")
    parser.add_argument("--requests", type=int, default=500, help="how many requests to send in all")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="folder of .jpg photos (any depth)")
    parser.add_argument("--photos", type=int, default=200, help="distinct photos to cycle through")
    parser.add_argument("--seed", type=int, default=1, help="which photos, in which order")
    parser.add_argument("--send", choices=["upload", "url"], default="upload", help="upload photos or send URLs")
    parser.add_argument(
        "--photo-base-url",
        default="",
        help="with --send url: URL of a copy of the dataset folder (a photo is <base>/<split>/<class>/<file>.jpg); "
        "empty: serve the folder from here on --serve-host",
    )
    parser.add_argument("--serve-host", default="127.0.0.1", help="address to serve the dataset folder on")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "photos"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.photo_base_url and args.send != "url":
        parser.error("--photo-base-url needs --send url")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        photos = pick_photos(args.dataset, args.photos, args.seed)
    except FileNotFoundError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        base = args.photo_base_url
        if args.send == "url" and not base:
            base = stack.enter_context(serving_folder(args.dataset, args.serve_host))
        if base and not base.endswith("/"):
            base += "/"
        what = f"URLs under {base}" if base else "uploads"
        print(
            f"{args.requests} requests to {args.url}/predict, {args.concurrency} at a time, "
            f"{len(photos)} photos from {args.dataset} as {what}",
            file=sys.stderr,
        )
        summary = run(
            args.url,
            photos,
            args.requests,
            args.concurrency,
            photo_base_url=base,
            timeout=args.timeout,
            progress=Progress(args.requests),
        )
    print(summary.report())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    return 0 if summary.outcomes and len(summary.ok) == len(summary.outcomes) == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
