"""Load generator for the clothing gateway: photo requests, in a closed or an open loop.

    make load-test URL=http://localhost:9696 REQUESTS=500 CONCURRENCY=8
    python loadtest.py --url http://localhost:9696 --requests 500 --concurrency 8
    python loadtest.py --rate 100 --duration 30 --requests 100000      # open loop: 100 arrivals/s for 30 s

Works against any gateway URL: local gunicorn, `make compose-up`, or a Kubernetes port-forward
(`kubectl port-forward svc/gateway 9696:80`); run it while `kubectl get hpa -w` shows the autoscaler react.

- Closed loop (the default): CONCURRENCY clients each send one request at a time, the next as soon as the
  last is answered. Their rate follows the gateway's: good for throughput, blind to a queue.
- Open loop (`--rate`): requests arrive at random times at that mean rate, whatever the answers do, as from
  many independent users, and latency counts from each arrival. This is how overload is measured.
- `--honour-retry-after`: a polite client; after `503` with `Retry-After` it waits that long and sends the
  same request again (up to 3 times).

Both loops cycle through a seeded mix of photos from every split and class of the dataset folder and stop at
REQUESTS or after `--duration` seconds. A progress line shows the rate and errors as it goes; the summary
gives throughput, p50/p95/p99 latency of the successful requests, the requests shed (`503 overloaded`),
the other errors by HTTP status and the gateway's error code, and apart from all of those the requests that
got no HTTP answer at all (refused, reset, closed, timed out).

Photos are uploaded by default, since a gateway elsewhere cannot fetch files from this machine.
`--send url` sends {"url": …} instead: with `--photo-base-url` pointing at a copy of the dataset folder
the gateway can reach, or else this script serves the folder itself on `--serve-host` (then the gateway
must be allowed to fetch from it, e.g. FETCH_ALLOW_HOSTS=127.0.0.1 for a local gateway). Each request is
encoded once and sent on keep-alive connections from one asyncio event loop, so the generator, which shares
the machine with what it measures, costs little CPU.

Exit status: 0 when every request got a 2xx, 1 otherwise, 2 for bad arguments. Needs only the standard library
(it runs on uvloop where that is installed: it then costs less CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import hashlib
import http.server
import json
import math
import os
import random
import ssl
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from contract import GATEWAY_PORT

ROOT = Path(__file__).resolve().parent
DEFAULT_DATASET = Path(os.environ.get("CLOTHING_DATASET", ROOT.parent / "shared" / "data" / "clothing-dataset-small"))


@dataclass(frozen=True)
class Photo:
    name: str  # path relative to the dataset folder
    data: bytes


@dataclass(frozen=True)
class Outcome:
    status: int | None  # None: no HTTP answer at all (refused, reset, closed, timed out)
    seconds: float  # from when the request was due (open loop: its scheduled arrival) to its answer
    error: str = ""  # the gateway's error code, or the exception's name when there was no answer
    retries: int = 0  # times it was sent again after a 503 with Retry-After (--honour-retry-after)
    finished: float = 0.0  # time.monotonic() of the answer
    queue_ms: float | None = None  # with --detail: the gateway's own timings, waiting for admission
    service_ms: float | None = None  # and working on it (its total minus the wait)


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
    mode: str = "closed"  # closed: `clients` each send one request at a time; open: arrivals at `rate` per second
    clients: int = 0
    rate: float = 0.0

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is not None and 200 <= o.status < 300]

    @property
    def shed(self) -> list[Outcome]:
        """Refused by the gateway's admission: 503 overloaded (an answer a client can act on)."""
        return [o for o in self.outcomes if o.status == 503 and o.error == "overloaded"]

    @property
    def no_answer(self) -> list[Outcome]:
        """No HTTP answer at all: what a client cannot act on, apart from the errors the gateway answered."""
        return [o for o in self.outcomes if o.status is None]

    @property
    def errors(self) -> collections.Counter:
        """Answered failures by "status code" (e.g. "503 overloaded"), and "no answer (ExceptionName)"."""
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
            "mode": self.mode,
            **({"clients": self.clients} if self.mode == "closed" else {"rate_rps": self.rate}),
            "requested": self.requested,
            "sent": len(self.outcomes),
            "ok": len(latencies),
            "shed": len(self.shed),
            "no_answer": len(self.no_answer),
            "retries": sum(o.retries for o in self.outcomes),
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
            **self._server_timings(),
        }

    def _server_timings(self) -> dict:
        """With --detail: the gateway's own view of the successful requests (waiting, then working)."""
        queue = [o.queue_ms for o in self.ok if o.queue_ms is not None]
        service = [o.service_ms for o in self.ok if o.service_ms is not None]
        if not queue:
            return {}
        return {
            "server_ms": {
                "queue_p50": round(percentile(queue, 50), 1),
                "queue_p99": round(percentile(queue, 99), 1),
                "queue_max": round(max(queue), 1),
                "service_p50": round(percentile(service, 50), 1),
                "service_p99": round(percentile(service, 99), 1),
            }
        }

    def report(self) -> str:
        d = self.as_dict()
        ms = d["latency_ms"]
        offered = f"{d['clients']} clients" if self.mode == "closed" else f"{d['rate_rps']:g} requests/s offered"
        lines = [
            f"requests    {d['sent']} sent of {d['requested']} ({offered}), {d['ok']} ok, {d['sent'] - d['ok']} failed "
            f"in {d['seconds']:.1f} s",
            f"throughput  {d['throughput_rps']:.1f} successful requests/s",
            f"latency     p50 {ms['p50']:.0f} ms   p95 {ms['p95']:.0f} ms   p99 {ms['p99']:.0f} ms   "
            f"(mean {ms['mean']:.0f}, max {ms['max']:.0f}; successful requests)",
            f"answers     {d['ok']} ok, {d['shed']} shed (503 overloaded), "
            f"{d['sent'] - d['ok'] - d['shed'] - d['no_answer']} other errors; "
            f"{d['no_answer']} got no answer at all" + (f"; {d['retries']} polite retries" if d["retries"] else ""),
        ]
        if "server_ms" in d:
            t = d["server_ms"]
            lines.append(
                f"gateway     waited p50 {t['queue_p50']:.0f} ms, p99 {t['queue_p99']:.0f} ms, "
                f"max {t['queue_max']:.0f} ms for a slot; worked p50 {t['service_p50']:.0f} ms, "
                f"p99 {t['service_p99']:.0f} ms"
            )
        if d["errors"]:
            lines.append("errors      " + "\n            ".join(f"{n:>5} × {k}" for k, n in d["errors"].items()))
        else:
            lines.append("errors      none")
        return "\n".join(lines)


class Progress:
    """One line that rewrites itself on a terminal, or a line per tenth of the budget elsewhere (CI logs)."""

    def __init__(self, total: int, stream=sys.stderr, duration: float | None = None):
        self.total, self.stream, self.duration = total, stream, duration
        self.tty = stream.isatty()
        self._shown = (0, -1)  # (tenth, done) of the last line written when not on a terminal

    def show(self, outcomes: list[Outcome], started: float, final: bool = False) -> None:
        done = len(outcomes)
        elapsed = max(time.monotonic() - started, 1e-9)
        # Progress by time when the run is bounded by time sooner than by count.
        fraction = min(elapsed / self.duration, 1.0) if self.duration else done / max(self.total, 1)
        tenth = int(fraction * 10)
        if not self.tty:
            if (tenth <= self._shown[0] and not final) or done == self._shown[1]:
                return
            self._shown = (tenth, done)
        failed = sum(1 for o in outcomes if o.status is None or not 200 <= o.status < 300)
        recent = [o.seconds for o in outcomes[-200:] if o.status is not None and 200 <= o.status < 300]
        where = f"{elapsed:5.0f}/{self.duration:g} s" if self.duration else f"{done:>6}/{self.total}"
        text = (
            f"{where} {100 * fraction:3.0f}%  {done / elapsed:7.1f} req/s  "
            f"errors {failed:<5} p50 {percentile(recent, 50) * 1000:5.0f} ms (last 200)"
        )
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


@dataclass(frozen=True)
class Request:
    """One request, encoded once: the body and content type of a photo upload or of a {"url": ...} request."""

    body: bytes
    content_type: str


def prepare(photo: Photo, photo_base_url: str = "") -> Request:
    if photo_base_url:
        return Request(json.dumps({"url": photo_base_url + quote(photo.name)}).encode(), "application/json")
    boundary = "loadtest" + hashlib.sha256(photo.data).hexdigest()[:24]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{Path(photo.name).name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return Request(head + photo.data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}")


class NoAnswer(Exception):
    """The connection ended, or broke the protocol, before a whole HTTP answer came back."""


class _Answers(asyncio.Protocol):
    """The bytes of one keep-alive connection, read as asyncio hands them over, and the answer to the request in
    flight on it: `waiter` is called once, with (status, headers, body) when the whole answer is in, or with the
    exception that says why none came (NoAnswer)."""

    def __init__(self):
        self.buffer = bytearray()
        self.waiter = None  # a callable while a request is in flight
        self.closed = False
        self._head: tuple | None = None  # (status, headers, version, where the body starts) once the head is in
        self._need = 0  # the buffer holds no whole answer before it has this many bytes

    def expect(self, waiter) -> None:
        self.waiter, self._head, self._need = waiter, None, 0

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and len(self.buffer) >= self._need:
            try:
                answer = self._answer(eof=False)
            except NoAnswer as error:
                self.finish(error)
            else:
                if answer is not None:
                    self.finish(answer)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None:
            try:
                answer = self._answer(eof=True)  # an answer without a length ends where the connection does
            except NoAnswer as error:
                answer = error
            if answer is None:
                answer = NoAnswer(f"the server closed the connection after {len(self.buffer)} bytes of an answer")
            self.finish(answer)

    def finish(self, answer) -> None:
        waiter, self.waiter = self.waiter, None
        waiter(answer)

    def _answer(self, eof: bool):
        """The whole answer if the buffer holds it (and drops it from the buffer), else None."""
        buffer = self.buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return None
            status_line, *lines = buffer[:end].decode("latin-1").split("\r\n")
            version, _, rest = status_line.partition(" ")
            if not version.startswith("HTTP/") or not rest[:3].isdigit():
                raise NoAnswer(f"not an HTTP answer: {status_line[:40]!r}")
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self._head = (int(rest[:3]), headers, version, end + 4)
        status, headers, version, start = self._head
        if "chunked" in headers.get("transfer-encoding", ""):
            body, end = self._chunks(start)
            if body is None:
                return None
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit():
                raise NoAnswer(f"an answer with a broken Content-Length: {length[:20]!r}")
            end = start + int(length)
            if len(buffer) < end:
                self._need = end
                return None
            body = bytes(buffer[start:end])
        elif eof:
            body, end = bytes(buffer[start:]), len(buffer)
            headers["connection"] = "close"
        else:
            return None
        del buffer[:end]
        if headers.get("connection", "").lower() == "close" or version == "HTTP/1.0":
            self.closed = True  # the server ends the connection after this answer
        return status, headers, body

    def _chunks(self, at: int) -> tuple[bytes | None, int]:
        """A chunked body starting at `at`: the body and where it ends, or (None, 0) while it is incomplete."""
        buffer, parts = self.buffer, []
        while True:
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                return None, 0
            try:
                size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
            except ValueError:
                raise NoAnswer("a chunked answer with a broken chunk size") from None
            if size == 0:
                end = buffer.find(b"\r\n\r\n", line_end)  # the last chunk, then trailers, if any, and a blank line
                return (b"".join(parts), end + 4) if end >= 0 else (None, 0)
            at = line_end + 2 + size + 2  # the chunk and its CRLF
            if len(buffer) < at:
                return None, 0
            parts.append(bytes(buffer[line_end + 2 : at - 2]))


class Connection:
    """One keep-alive HTTP/1.1 connection, sending requests encoded ahead of time.

    The load generator shares the machine with what it measures, so a request must cost it little: one event
    loop; per request, one write of bytes made once, and a protocol that reads the answer as it arrives and calls
    back, with no task, stream or HTTP library of its own. It reconnects after a failure or when the server
    closes."""

    def __init__(self, url: str, timeout: float, detail: bool = False, encoded: dict | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url must be http(s)://host[:port], not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.timeout = timeout
        self.path = (parts.path.rstrip("/") or "") + "/predict" + ("?detail=1" if detail else "")
        self._encoded = {} if encoded is None else encoded  # request -> its bytes on the wire; shared by a run
        self._transport = None
        self._answers: _Answers | None = None
        self.last_used = 0.0  # time.monotonic() of its last answer
        self.deadline = math.inf  # time.monotonic() by which the answer in flight must be whole

    def _wire(self, request: Request) -> bytes:
        wire = self._encoded.get(request)
        if wire is None:
            wire = self._encoded[request] = (
                f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {request.content_type}"
                f"\r\nContent-Length: {len(request.body)}\r\nUser-Agent: loadtest.py\r\n\r\n"
            ).encode() + request.body
        return wire

    def ready(self) -> bool:
        """Connected and fit for the next request: not closed, no bytes nobody asked for, and not idle so long that
        the server may be closing it right now (gunicorn keeps idle connections 5 s)."""
        answers = self._answers
        return (
            answers is not None
            and not answers.closed
            and not answers.buffer
            and time.monotonic() - self.last_used <= IDLE_SECONDS
        )

    async def connect(self) -> None:
        """A new connection in place of this one, within the timeout."""
        self.close()
        async with asyncio.timeout(self.timeout):
            loop = asyncio.get_running_loop()
            self._transport, self._answers = await loop.create_connection(_Answers, self.host, self.port, ssl=self.tls)
        self.last_used = time.monotonic()

    def start(self, request: Request, done) -> None:
        """Send `request` on this connection (connected and ready()); `done` is called once, with (status, headers,
        body) or with the exception that says why no whole answer came (then the connection is closed)."""

        def finished(answer) -> None:
            self.deadline = math.inf
            if isinstance(answer, BaseException):
                self.close()
            else:
                self.last_used = time.monotonic()
            done(answer)

        self.deadline = time.monotonic() + self.timeout
        self._answers.expect(finished)
        self._transport.write(self._wire(request))

    def expire(self, now: float) -> None:
        """Give up on the answer in flight if its deadline (time.monotonic()) has passed."""
        if now > self.deadline and self._answers is not None and self._answers.waiter is not None:
            self._answers.finish(TimeoutError("no whole answer within the timeout"))

    async def post(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        if not self.ready():
            await self.connect()
        loop = asyncio.get_running_loop()
        answer = loop.create_future()

        def done(result) -> None:
            if not answer.done():
                if isinstance(result, BaseException):
                    answer.set_exception(result)
                else:
                    answer.set_result(result)

        timer = loop.call_later(self.timeout + 0.01, lambda: self.expire(time.monotonic()))
        try:
            self.start(request, done)
            return await answer
        except BaseException:
            self.close()
            raise
        finally:
            timer.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._transport = self._answers = None
        self.deadline = math.inf


# A connection idle this long is not used again: a server closes idle keep-alive connections after a timeout of
# its own (gunicorn's is 5 s), and a request sent just as it does so gets no answer. Browsers and HTTP libraries
# retry such a request on a new connection; this client, which counts every request that got no answer, avoids
# the race instead, and never retries on its own.
IDLE_SECONDS = 2.0
MAX_RETRIES = 3  # polite retries of one request after 503 + Retry-After
MAX_RETRY_WAIT = 30.0  # seconds; a longer Retry-After is taken as this
NO_ANSWER = (OSError, NoAnswer, TimeoutError, ValueError)


def _outcome(answer, due: float, retries: int, detail: bool) -> tuple[Outcome, float | None]:
    """What a client makes of an answer (status, headers, body) or of the exception instead of one: the Outcome,
    and how long Retry-After asks it to wait if the answer was a 503 that says (else None)."""
    if isinstance(answer, BaseException):
        return Outcome(None, time.perf_counter() - due, type(answer).__name__, retries, time.monotonic()), None
    status, headers, body = answer
    code, queue_ms, service_ms = "", None, None
    if status == 503 and b'"code": "overloaded"' in body:
        code = "overloaded"  # the commonest answer under overload, known without parsing it
    elif not 200 <= status < 300:
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = f"not the gateway's JSON ({headers.get('server', 'no Server header')})"
    elif detail:
        try:
            timings = json.loads(body).get("timings_ms", {})
        except (ValueError, AttributeError):
            timings = {}  # a 2xx without the gateway's timings: no timings to keep
        if "queue" in timings and "total" in timings:
            queue_ms, service_ms = timings["queue"], timings["total"] - timings["queue"]
    retry_after = headers.get("retry-after", "")
    wait = min(float(retry_after), MAX_RETRY_WAIT) if status == 503 and retry_after.isdigit() else None
    outcome = Outcome(status, time.perf_counter() - due, code, retries, time.monotonic(), queue_ms, service_ms)
    return outcome, wait


async def send(connection: Connection, request: Request, due: float, honour_retry_after: bool = False) -> Outcome:
    """POST one request; `due` is the perf_counter() time it was meant to go (its latency counts from there)."""
    detail = connection.path.endswith("detail=1")
    retries = 0
    while True:
        try:
            answer = await connection.post(request)
        except NO_ANSWER as error:
            answer = error
        outcome, wait = _outcome(answer, due, retries, detail)
        if honour_retry_after and wait is not None and retries < MAX_RETRIES:
            await asyncio.sleep(wait)
            retries += 1
            continue
        return outcome


def _event_loop_factory():
    """uvloop's event loop where it is installed (the gateway's environment has it), else asyncio's own (None).
    The generator shares the machine with what it measures, and on uvloop a request costs it less CPU."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@dataclass(eq=False)
class _RunState:
    """What one run sends and what came back: the requests, encoded once and handed out in turn by claim(), how to
    send them, and the outcomes so far (appended on the loop's thread, read by the progress line)."""

    prepared: list[Request]
    connect: Callable[[], Connection]  # a new connection; a run's connections share the encoded requests
    total: int  # requests to send at most
    deadline: float  # time.monotonic() from which none is sent
    stop: threading.Event  # once set, none is sent
    detail: bool = False
    honour_retry_after: bool = False
    outcomes: list[Outcome] = field(default_factory=list)
    issued: int = 0

    def claim(self, at: float | None = None) -> int | None:
        """The index of the next request to send (now, or at time.monotonic() time `at`), or None: done."""
        when = time.monotonic() if at is None else at
        if self.issued >= self.total or self.stop.is_set() or when >= self.deadline:
            return None
        self.issued += 1
        return self.issued - 1

    def request(self, index: int) -> Request:
        return self.prepared[index % len(self.prepared)]


async def _closed_client(state: _RunState) -> None:
    """One client of the closed loop: it sends its next request as soon as the last is answered."""
    connection = state.connect()
    while (index := state.claim()) is not None:
        outcome = await send(connection, state.request(index), time.perf_counter(), state.honour_retry_after)
        state.outcomes.append(outcome)
    connection.close()


class _OpenLoop:
    """The open loop: arrivals on the loop's timers and answers on the connections' callbacks, with no task,
    coroutine or semaphore per request (a task is made only to open a connection). Up to `max_outstanding`
    requests are out at once; later arrivals queue, and their latency still counts from their arrival."""

    def __init__(self, state: _RunState, rate: float, max_outstanding: int, seed: int):
        self.state, self.rate, self.max_outstanding = state, rate, max_outstanding
        self.arrivals = random.Random(seed)  # noqa: S311 (reproducible arrival times, not a secret)
        self.idle: list[Connection] = []
        self.busy: set[Connection] = set()
        self.queued: collections.deque = collections.deque()  # (index, due, retries) waiting for a free place
        self.out = 0  # requests out (sent, connecting or waiting out a Retry-After)
        self.scheduled = 0  # arrivals set on the loop's timers that have not come yet
        self.issuing = True
        self.loop: asyncio.AbstractEventLoop | None = None
        self.all_done: asyncio.Future | None = None

    async def run(self) -> None:
        """Send every request as it arrives, wait for the last answer, then close the idle connections."""
        self.loop = asyncio.get_running_loop()
        self.all_done = self.loop.create_future()
        sweeper = self.loop.create_task(self.sweep())
        await self.issue()
        self.issuing = False
        if self.out or self.queued or self.scheduled:  # the last timers may still be due: a sleep can wake early
            await self.all_done
        sweeper.cancel()
        for connection in self.idle:
            connection.close()

    async def issue(self) -> None:
        """Set every arrival on the loop's timers and return after the last. Arrival times are drawn a little ahead,
        a tenth of a second at a time."""
        loop = self.loop
        to_perf = time.perf_counter() - loop.time()  # loop.time() + to_perf: the perf_counter() time
        due = last = loop.time()
        while (index := self.state.claim(at=(due := due + self.arrivals.expovariate(self.rate)))) is not None:
            loop.call_at(due, self.arrive, index, due + to_perf)
            self.scheduled += 1
            last = due
            if due - loop.time() > 0.1:
                await asyncio.sleep(due - loop.time() - 0.05)
        await asyncio.sleep(max(0.0, last - loop.time()))  # until the last arrival

    def arrive(self, index: int, due: float) -> None:
        self.scheduled -= 1
        if self.out >= self.max_outstanding:
            self.queued.append((index, due, 0))
            return
        self.out += 1
        self.go(index, due, 0)

    def go(self, index: int, due: float, retries: int) -> None:
        """Send the request on an idle connection that is still fit for it, else open a new one first."""
        while self.idle:
            connection = self.idle.pop()
            if connection.ready():
                self.busy.add(connection)
                answered = functools.partial(self.answered, connection, index, due, retries)
                connection.start(self.state.request(index), answered)
                return
            connection.close()
        connection = self.state.connect()
        opening = self.loop.create_task(connection.connect())
        opening.add_done_callback(functools.partial(self.opened, connection, index, due, retries))

    def opened(self, connection: Connection, index: int, due: float, retries: int, task: asyncio.Task) -> None:
        error = NoAnswer("cancelled") if task.cancelled() else task.exception()
        if error is not None:
            self.finish(_outcome(error, due, retries, self.state.detail)[0])
            return
        self.idle.append(connection)
        self.go(index, due, retries)

    def answered(self, connection: Connection, index: int, due: float, retries: int, answer) -> None:
        self.busy.discard(connection)
        if not isinstance(answer, BaseException):
            self.idle.append(connection)
        try:
            outcome, wait = _outcome(answer, due, retries, self.state.detail)
        except Exception as error:  # a fault here must not lose the request: it counts as one without an answer
            outcome, wait = _outcome(error, due, retries, self.state.detail)[0], None
        if self.state.honour_retry_after and wait is not None and retries < MAX_RETRIES:
            self.loop.call_later(wait, self.go, index, due, retries + 1)  # keeps its place meanwhile
            return
        self.finish(outcome)

    def finish(self, outcome: Outcome) -> None:
        """Count the request as done and send the first queued one in its place, or end the run after the last."""
        self.state.outcomes.append(outcome)
        self.out -= 1
        if self.queued:
            index, due, retries = self.queued.popleft()
            self.out += 1
            self.go(index, due, retries)
        elif not self.issuing and self.out == 0 and not self.scheduled and not self.all_done.done():
            self.all_done.set_result(None)

    async def sweep(self) -> None:
        """Give up on answers past their deadline, checked a few times a second."""
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for connection in list(self.busy):
                connection.expire(now)


async def _watch(work: list[Coroutine], outcomes: list[Outcome], started: float, progress: Progress | None) -> None:
    """Run the coroutines `work` together, showing the progress line as they go."""
    runner = asyncio.gather(*work)
    while not runner.done():
        await asyncio.wait([runner], timeout=0.25)
        if progress:
            progress.show(outcomes, started)
    await runner


def _run_in_thread(main: Coroutine, stop: threading.Event, patience: float) -> None:
    """Run the coroutine `main` on an event loop in a thread of its own, so this works where a loop already runs
    (as in a notebook). Ctrl-C sets `stop` and waits up to `patience` seconds for the thread to end; an exception
    raised in the thread is raised here."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
                runner.run(main)
        except BaseException as error:  # surfaced in the calling thread below
            failure.append(error)

    thread = threading.Thread(target=target, name="loadtest", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.25)  # a short join keeps the main thread free to take Ctrl-C
    except KeyboardInterrupt:
        stop.set()
        thread.join(patience)
    if failure:
        raise failure[0]


def run(
    url: str,
    photos: list[Photo],
    requests_total: int,
    concurrency: int = 8,
    *,
    rate: float | None = None,
    duration: float | None = None,
    photo_base_url: str = "",
    timeout: float = 30.0,
    honour_retry_after: bool = False,
    max_outstanding: int = 512,
    seed: int = 1,
    detail: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> Summary:
    """Send up to `requests_total` POST /predict requests, for at most `duration` seconds when given.

    Closed loop (no `rate`): `concurrency` clients, each sending its next request when the last is answered.
    Open loop (`rate` per second): requests arrive at random (Poisson) times at that mean rate, whatever the
    answers do; each goes on an idle connection (up to `max_outstanding` at once) and its latency counts from
    its arrival, so a slow gateway cannot slow the load down and hide its queue. Photos are uploaded unless
    `photo_base_url` is given (then {"url": photo_base_url + name}). `detail` asks for ?detail=1 answers and
    keeps the gateway's own timings of each. `stop` ends the run early.

    The requests go from one asyncio event loop, in a thread of its own (so this works where a loop already
    runs, as in a notebook)."""
    prepared = [prepare(photo, photo_base_url) for photo in photos]
    Connection(url, timeout)  # a bad URL fails here
    stop = stop or threading.Event()
    started = time.monotonic()
    state = _RunState(
        prepared,
        functools.partial(Connection, url, timeout, detail, {}),  # the connections share the encoded requests
        requests_total,
        started + duration if duration else math.inf,
        stop,
        detail,
        honour_retry_after,
    )
    if rate:
        work = [_OpenLoop(state, rate, max_outstanding, seed).run()]
    else:
        work = [_closed_client(state) for _ in range(concurrency)]
    _run_in_thread(_watch(work, state.outcomes, started, progress), stop, timeout + 1)
    mode = "open" if rate else "closed"
    summary = Summary(list(state.outcomes), time.monotonic() - started, requests_total, mode, concurrency, rate or 0.0)
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
    parser.add_argument("--requests", type=int, default=500, help="how many requests to send in all (at most)")
    parser.add_argument("--concurrency", type=int, default=8, help="closed loop: clients, each one request at a time")
    parser.add_argument(
        "--rate",
        type=float,
        help="open loop instead: requests arrive at this mean rate per second (Poisson), whatever the answers do",
    )
    parser.add_argument("--duration", type=float, help="stop sending after this many seconds (and --requests)")
    parser.add_argument(
        "--honour-retry-after",
        action="store_true",
        help=f"after a 503 with Retry-After, wait that long and send again, up to {MAX_RETRIES} times (polite)",
    )
    parser.add_argument("--max-outstanding", type=int, default=512, help="open loop: connections in flight at most")
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
    parser.add_argument("--detail", action="store_true", help="ask for ?detail=1 and report the gateway's timings")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "photos", "max_outstanding"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("rate", "duration"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be more than 0")
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
        how = f"arriving at {args.rate:g}/s (open loop)" if args.rate else f"{args.concurrency} at a time"
        within = f" within {args.duration:g} s" if args.duration else ""
        print(
            f"up to {args.requests} requests{within} to {args.url}/predict, {how}, "
            f"{len(photos)} photos from {args.dataset} as {what}",
            file=sys.stderr,
        )
        try:
            summary = run(
                args.url,
                photos,
                args.requests,
                args.concurrency,
                rate=args.rate,
                duration=args.duration,
                photo_base_url=base,
                timeout=args.timeout,
                honour_retry_after=args.honour_retry_after,
                max_outstanding=args.max_outstanding,
                seed=args.seed,
                detail=args.detail,
                progress=Progress(args.requests, duration=args.duration),
            )
        except ValueError as error:
            print(f"loadtest: {error}", file=sys.stderr)
            return 2
    print(summary.report())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    expected = len(summary.outcomes) if args.duration else args.requests
    return 0 if summary.outcomes and len(summary.ok) == len(summary.outcomes) == expected else 1


if __name__ == "__main__":
    sys.exit(main())
