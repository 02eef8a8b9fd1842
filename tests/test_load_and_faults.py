"""Load and faults: the gateway under gunicorn in front of a model server, pushed and then broken.

- 1,000 photo uploads at concurrency 16: no errors, and the workers' memory stays put;
- the model server killed mid-load: fast 503/504 answers, then success again once it is back, with the
  same gateway processes;
- a model server that answers slowly: the gateway's deadline holds (504);
- overload: far more requests than the workers have slots for are shed with 503 instead of queueing;
- SIGTERM to the gateway, then to the model server, under load: every request already accepted completes;
- fuzzing the API the gateway publishes at /openapi.json, then broken JSON and images: never a 5xx,
  never a dead worker.

Every test is bounded in requests and seconds, and every byte goes to 127.0.0.1: the fuzz runs in-process
with DNS and connections replaced by fakes, and the requests sent to a real gunicorn name only IP addresses
that safe_fetch refuses before connecting.

Most tests talk to FakeModelServer, TF Serving's Predict in a few lines of grpc with protobuf.py's
messages, which starts in milliseconds and can be made as slow as a test needs. The load, kill and SIGTERM
tests use model_server.py itself.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import functools
import http.server
import io
import ipaddress
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc
import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import gateway
import loadtest
import photos as photos_module
import protobuf
import safe_fetch
from conftest import PANTS, ROOT
from contract import CLASSES, INPUT_NAME, MODEL_NAME, OUTPUT_NAME, UINT8_SIGNATURE_NAME
from gateway_parts import fetching
from gateway_parts.model_client import RECONNECT_WAIT
from gateways import free_port, running_gateway
from servers import FakeModelServer, running_model_server

MIB = 2**20


def start_gateway(stack: contextlib.ExitStack, tf_serving_host: str, log_dir, **kwargs):
    """running_gateway, stopped when `stack` closes."""
    return stack.enter_context(running_gateway(tf_serving_host, log_dir, **kwargs))


def worker_pids(gw) -> set[int]:
    return {p.pid for p in psutil.Process(gw.process.pid).children()}


def workers_rss(gw) -> int:
    return sum(p.memory_info().rss for p in psutil.Process(gw.process.pid).children())


@dataclass(frozen=True)
class Answer:
    started: float  # time.monotonic()
    seconds: float
    status: int | None  # None: no HTTP answer (refused, reset)
    code: str = ""  # the gateway's error code
    retry_after: str | None = None


def post_photo(url: str, photo: loadtest.Photo, session=requests, timeout: float = 30) -> Answer:
    started = time.monotonic()
    try:
        response = session.post(
            f"{url}/predict", data=photo.data, headers={"Content-Type": "image/jpeg"}, timeout=timeout
        )
    except requests.RequestException as error:  # refused, reset or timed out: no answer, recorded as such
        return Answer(started, time.monotonic() - started, None, type(error).__name__)
    return Answer(
        started,
        time.monotonic() - started,
        response.status_code,
        _code_of(response),
        response.headers.get("Retry-After"),
    )


def _code_of(response: requests.Response) -> str:
    """The gateway's error code; "" for a 200; an answer that is not the gateway's JSON says so (the tests' checks
    on codes then fail, naming it)."""
    if response.status_code == 200:
        return ""
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "not the gateway's JSON error"


def at_once(url: str, photos, count: int, timeout: float = 30) -> list[Answer]:
    """`count` uploads sent together, each on its own connection."""
    with futures.ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda i: post_photo(url, photos[i % len(photos)], timeout=timeout), range(count)))


class Background:
    """Clients uploading photos back to back until stopped (or `limit` requests); every answer is kept."""

    def __init__(self, url: str, photos, clients: int, limit: int = 5000):
        self.url, self.photos, self.limit = url, photos, limit
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Background:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(40)

    def _client(self, index: int) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                with self._lock:
                    if len(self.answers) >= self.limit:
                        return
                answer = post_photo(self.url, self.photos[index], session)
                with self._lock:
                    self.answers.append(answer)
                if answer.status != 200:
                    self._stop.wait(0.05)  # back off a little, as a client should, instead of spinning

    def wait_for(self, condition, timeout: float) -> None:
        """Wait until condition(answers) holds; fail the test after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                answers = list(self.answers)
            if condition(answers):
                return
            assert time.monotonic() < deadline, f"gave up after {timeout} s; answers so far: {_tally(answers)}"
            time.sleep(0.05)


def _tally(answers) -> dict:
    return dict(collections.Counter(f"{a.status} {a.code}".strip() for a in answers))


def _inflight(gw) -> float:
    """The gateway's gateway_inflight_requests gauge (one worker, so one process's value)."""
    text = requests.get(f"{gw.url}/metrics", timeout=5).text
    return float(re.search(r"^gateway_inflight_requests (\S+)$", text, re.M).group(1))


def _preprocessed(gw) -> float:
    """How many requests the gateway has preprocessed: each then calls the model at once."""
    text = requests.get(f"{gw.url}/metrics", timeout=5).text
    return float(re.search(r'^gateway_stage_seconds_count\{stage="preprocess"\} (\S+)$', text, re.M).group(1))


def _refuses_new_calls(target: str) -> bool:
    """Whether the model server at `target` answers a new call UNAVAILABLE (it is draining, or gone)."""
    with grpc.insecure_channel(target) as channel:
        status = channel.unary_unary(
            protobuf.STATUS_METHOD,
            request_serializer=protobuf.GetModelStatusRequest.SerializeToString,
            response_deserializer=protobuf.GetModelStatusResponse.FromString,
        )
        request = protobuf.GetModelStatusRequest()
        request.model_spec.name = MODEL_NAME
        try:
            status(request, timeout=5)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNAVAILABLE
    return False


@pytest.fixture(scope="module")
def photos(photo_folder):
    return loadtest.pick_photos(photo_folder, 120)


@pytest.fixture(scope="module")
def model_server(model_base):
    with running_model_server(model_base, rest_api_port=0) as server:
        yield server


@pytest.fixture(scope="module")
def served(model_server, tmp_path_factory):
    """Two workers of eight slots each, no shedding below 16 requests at once (as the load test needs)."""
    with contextlib.ExitStack() as stack:
        yield start_gateway(
            stack,
            model_server.grpc_target,
            tmp_path_factory.mktemp("gateway"),
            workers=2,
            GATEWAY_MAX_INFLIGHT="8",
            GATEWAY_QUEUE_BUDGET="30",
            FETCH_ALLOW_HOSTS="127.0.0.1",
        )


# ---- load ------------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_a_thousand_uploads_at_concurrency_16_without_errors_or_memory_growth(served, photos):
    warm_up = loadtest.run(served.url, photos, 200, 16)
    assert not warm_up.errors, warm_up.report()
    pids, before = worker_pids(served), workers_rss(served)

    summary = loadtest.run(served.url, photos, 1000, 16)
    after = workers_rss(served)

    growth = (after - before) / MIB
    print(f"\n{summary.report()}")
    print(
        f"gateway workers' RSS: {before / MIB:.0f} MiB after 200 warm-up requests, "
        f"{after / MIB:.0f} MiB after 1,000 more ({growth:+.1f} MiB)"
    )
    assert len(summary.outcomes) == 1000 and len(summary.ok) == 1000, summary.report()
    assert worker_pids(served) == pids, "a worker was restarted during the run"
    assert growth < 100, f"the workers grew by {growth:.0f} MiB over 1,000 requests"


@pytest.mark.timeout(60)
def test_loadtest_script_reports_uploads_and_urls(served, photo_folder, tmp_path):
    # The last run hides uvloop: the script needs only the standard library.
    hide = "import runpy, sys; sys.modules['uvloop'] = None; sys.argv[:] = sys.argv[1:]; "
    no_uvloop = ["-c", hide + "runpy.run_path(sys.argv[0], run_name='__main__')"]
    for send, python in (("upload", []), ("url", []), ("upload", no_uvloop)):
        out = tmp_path / f"{send}-{len(python)}.json"
        run = subprocess.run(
            [sys.executable, *python, "loadtest.py", "--url", served.url, "--requests", "24", "--concurrency", "4"]
            + ["--dataset", str(photo_folder), "--send", send, "--json", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=50,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "p95" in run.stdout and "errors      none" in run.stdout
        assert "24/24 100%" in run.stderr  # the progress display
        summary = json.loads(out.read_text())
        assert summary["ok"] == 24 and summary["status_counts"] == {"200": 24}
        assert summary["latency_ms"]["p50"] > 0


# ---- the model tier fails ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_model_server_killed_mid_load_fails_fast_then_recovers_with_the_same_gateway(model_base, photos, tmp_path):
    port, deadline = free_port(), 5.0
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(running_model_server(model_base, port=port, rest_api_port=0))
        gw = start_gateway(
            stack,
            f"127.0.0.1:{port}",
            tmp_path,
            workers=1,
            PREDICT_TIMEOUT_SECONDS=str(deadline),
            GATEWAY_MAX_INFLIGHT="8",
            GATEWAY_QUEUE_BUDGET="10",
        )
        pids = worker_pids(gw)
        with Background(gw.url, photos, clients=4) as load:
            load.wait_for(lambda answers: sum(a.status == 200 for a in answers) >= 20, timeout=30)
            first.process.kill()
            killed_at = time.monotonic()
            load.wait_for(lambda answers: sum(a.started > killed_at for a in answers) >= 20, timeout=30)
            restarting_at = time.monotonic()
            stack.enter_context(running_model_server(model_base, port=port, rest_api_port=0))
            back_at = time.monotonic()
            load.wait_for(lambda answers: sum(a.started > back_at and a.status == 200 for a in answers) >= 20, 30)
        answers = load.answers
        assert gw.process.poll() is None and worker_pids(gw) == pids, "the gateway was restarted"

    down = [a for a in answers if killed_at < a.started and a.started + a.seconds < restarting_at]
    print(f"\nwhile the model server was down: {_tally(down)}")
    assert down and all(a.status in (503, 504) for a in down), _tally(down)
    assert {a.code for a in down} <= {"model_unavailable", "model_timeout"}
    # Fast: the gateway gives a reconnecting model server a short grace, then answers; nothing waits for
    # the deadline, let alone past it.
    grace = min(deadline, RECONNECT_WAIT)
    assert sorted(a.seconds for a in down)[len(down) // 2] < grace + 1
    assert max(a.seconds for a in down) < deadline + 1.5
    assert all(a.retry_after for a in down if a.status == 503)
    assert any(a.status == 200 for a in answers if a.started > back_at)


@pytest.mark.timeout(60)
def test_a_slow_model_server_gets_a_504_at_the_gateway_deadline(photos, tmp_path):
    deadline = 1.0
    with FakeModelServer(delay=30) as slow, contextlib.ExitStack() as stack:
        gw = start_gateway(stack, slow.target, tmp_path, workers=1, PREDICT_TIMEOUT_SECONDS=str(deadline))
        answers = at_once(gw.url, photos, 3)
        assert requests.get(f"{gw.url}/healthz", timeout=5).ok
    assert [a.status for a in answers] == [504] * 3 and {a.code for a in answers} == {"model_timeout"}
    assert all(deadline <= a.seconds < deadline + 2 for a in answers), [a.seconds for a in answers]
    assert slow.calls == 3


@pytest.mark.timeout(90)
def test_overload_is_shed_with_503_instead_of_queueing(photos, tmp_path):
    count, slots, delay = 32, 2, 1.0
    with FakeModelServer(delay=delay) as model, contextlib.ExitStack() as stack:
        gw = start_gateway(
            stack,
            model.target,
            tmp_path,
            workers=1,
            GATEWAY_MAX_INFLIGHT=str(slots),
            GATEWAY_QUEUE_BUDGET="0.2",
        )
        answers = at_once(gw.url, photos, count)
    shed = [a for a in answers if a.status == 503]
    seconds = sorted(a.seconds for a in answers)
    print(
        f"\n{count} requests at once, {slots} slots, model {delay} s: {_tally(answers)}; "
        f"answered in p50 {seconds[count // 2]:.2f} s, max {seconds[-1]:.2f} s"
    )
    assert {a.status for a in answers} <= {200, 503}, _tally(answers)
    assert all(a.code == "overloaded" and a.retry_after for a in shed)
    assert len(shed) >= count // 2
    assert model.peak <= slots, "the model tier saw more calls at once than the gateway allows"
    # Queued instead of shed, the last request would wait count / slots x delay = 16 s.
    assert seconds[-1] < count / slots * delay / 2


@pytest.mark.timeout(120)
def test_an_overload_burst_answers_every_request_with_200_or_a_json_503(tmp_path):
    """Keep-alive clients uploading photos over 64 KiB to a gateway that sheds most of them. A 503 sent before the
    body was read once left the body on the socket (gunicorn's threaded workers drained 64 KiB of it at most, then
    closed the connection), so the client's next request on it got no answer. Every request must get an HTTP
    answer."""
    large = [photos_module.jpeg(seed, size=(1600, 1200)) for seed in range(4)]
    assert min(len(p) for p in large) > 64 * 1024
    clients, total = 16, 400
    answers: list[Answer] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with requests.Session() as session:  # keep-alive: the next request goes on the same connection
            while True:
                with lock:
                    if len(answers) >= total:
                        return
                files = {"image": ("photo.jpg", large[index % len(large)], "image/jpeg")}
                started = time.monotonic()
                try:
                    response = session.post(f"{gw.url}/predict", files=files, timeout=30)
                except requests.RequestException as error:  # refused, reset or timed out: recorded, not raised
                    answer = Answer(
                        started, time.monotonic() - started, None, type(error.__context__ or error).__name__
                    )
                else:
                    answer = Answer(started, time.monotonic() - started, response.status_code, _code_of(response))
                with lock:
                    answers.append(answer)

    with FakeModelServer(delay=0.05) as model, contextlib.ExitStack() as stack:
        gw = start_gateway(
            stack, model.target, tmp_path, workers=1, GATEWAY_MAX_INFLIGHT="1",
            GATEWAY_QUEUE_BUDGET="0.05",
        )  # fmt: skip
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(100)
    assert not any(thread.is_alive() for thread in threads), "a client was still waiting after 100 s"
    tally = _tally(answers)
    print(f"\n{len(answers)} uploads of {min(map(len, large)) // 1024}+ KiB from {clients} keep-alive clients: {tally}")
    assert set(tally) <= {"200", "503 overloaded"}, tally
    assert tally.get("200") and tally.get("503 overloaded", 0) >= len(answers) // 4, "the burst should shed"


# ---- SIGTERM: accepted requests complete -----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_sigterm_to_the_gateway_under_load_completes_every_accepted_request(photos, tmp_path):
    clients = 6
    with FakeModelServer(delay=1.5) as model, contextlib.ExitStack() as stack:
        gw = start_gateway(
            stack,
            model.target,
            tmp_path,
            workers=2,  # keep-alive connections stay with one worker: either may get all six
            GATEWAY_MAX_INFLIGHT="8",
            GATEWAY_QUEUE_BUDGET="10",
        )
        with Background(gw.url, photos, clients=clients) as load:
            load.wait_for(lambda _: model.in_flight == clients, timeout=20)  # accepted, and at the model
            term_at = time.monotonic()
            gw.process.send_signal(signal.SIGTERM)
            exit_code = gw.process.wait(timeout=40)
            stopped_at = time.monotonic()
        answers = load.answers
        log = gw.log()
    before = [a for a in answers if a.started < term_at]
    after = [a for a in answers if a.started >= term_at]
    print(f"\nSIGTERM with {clients} in flight: before {_tally(before)}, after {_tally(after)}")
    assert exit_code == 0, log[-2000:]
    assert len(before) >= clients and all(a.status == 200 for a in before), _tally(before)
    assert {a.status for a in after} <= {200, None}, _tally(after)  # refused once the gateway closed, never a 5xx
    assert stopped_at - term_at < 25  # gunicorn.conf.py's graceful_timeout
    assert "Traceback" not in log


@pytest.fixture(scope="module")
def slow_model_base(tmp_path_factory):
    """A SavedModel with the clothing signature whose every call sleeps about 0.8 s, then answers zeros.

    The sleep is a tf.data sleep inside the graph, so model_server.py serves it like any model (the calls
    take turns: three at once finish after about 0.8, 1.6 and 2.4 s).
    """
    import tensorflow as tf
    from tensorflow.python.data.experimental.ops.testing import sleep  # TF's own test helper; no public op sleeps

    class Slow(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 299, 299, 3], tf.float32, name=INPUT_NAME)])
        def serve(self, images):
            # The dataset sleeps before its element and again before saying it is done: 2 x 0.4 s.
            pause = tf.data.Dataset.from_tensors(0).apply(sleep(400_000)).reduce(0, lambda total, x: total + x)
            rows = tf.shape(images)[0]
            return {OUTPUT_NAME: tf.zeros([rows, len(CLASSES)]) + tf.cast(pause, tf.float32)}

    base = tmp_path_factory.mktemp("slow") / MODEL_NAME
    module = Slow()
    tf.saved_model.save(module, str(base / "1"), signatures={"serving_default": module.serve})
    return base


@pytest.mark.timeout(120)
def test_sigterm_to_the_model_server_under_load_completes_every_accepted_request(slow_model_base, photos, tmp_path):
    clients = 3
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running_model_server(slow_model_base, rest_api_port=0, grace_period_seconds=20))
        gw = start_gateway(
            stack, server.grpc_target, tmp_path, workers=1, PREDICT_TIMEOUT_SECONDS="20", GATEWAY_MAX_INFLIGHT="8"
        )
        assert post_photo(gw.url, photos[0]).status == 200
        pool = stack.enter_context(futures.ThreadPoolExecutor(max_workers=2 * clients))
        accepted = [pool.submit(post_photo, gw.url, photos[i]) for i in range(clients)]
        deadline = time.monotonic() + 20
        while _inflight(gw) < clients or _preprocessed(gw) < clients + 1:  # the calls are at the model server
            assert time.monotonic() < deadline, "the requests never reached the model server"
            time.sleep(0.05)
        term_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        while not _refuses_new_calls(server.grpc_target):  # it has begun to drain
            assert time.monotonic() < term_at + 10, server.log()[-2000:]
            time.sleep(0.05)
        meanwhile = [pool.submit(post_photo, gw.url, photos[clients + i]) for i in range(clients)]
        exit_code = server.process.wait(timeout=40)
        stopped_at = time.monotonic()
        answers = [f.result() for f in accepted]
        refused = [f.result() for f in meanwhile]
        assert gw.process.poll() is None
        log = server.log()
    print(
        f"\nmodel server SIGTERM with {clients} calls in flight: {_tally(answers)}; sent while it drained: "
        f"{_tally(refused)}; it exited {stopped_at - term_at:.1f} s after the signal"
    )
    assert exit_code == 0, log[-2000:]
    assert [a.status for a in answers] == [200] * clients, _tally(answers)
    assert all(a.status == 503 and a.code == "model_unavailable" for a in refused), _tally(refused)
    assert stopped_at - term_at < 20


# ---- fuzz ------------------------------------------------------------------------------------------------


def _offline_fetches(monkeypatch) -> list[str]:
    """Make every URL fetch in this process end before the network: no DNS query, no connection.

    Every host name "resolves" to 192.0.2.1 (TEST-NET-1), which safe_fetch refuses as non-public; should
    anything get past that check, the connection is refused here and recorded.
    """
    attempts: list[str] = []

    def fake_dns(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("192.0.2.1", port))]

    def no_connection(target, *args, **kwargs):
        attempts.append(target.url)
        raise safe_fetch.UnreachableURL(f"the tests never connect ({target.url})")

    monkeypatch.setattr(fetching, "fetch_image", functools.partial(safe_fetch.fetch_image, resolver=fake_dns))
    monkeypatch.setattr(safe_fetch, "_connect", no_connection)
    return attempts


def _check_answer(response_status: int, body: bytes, what) -> None:
    assert response_status < 500, f"{response_status} for {what}: {body[:300]!r}"
    if response_status >= 400:
        error = json.loads(body)["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str), what


@pytest.fixture()
def fuzz_model():
    with FakeModelServer() as model:
        yield model


@pytest.fixture()
def fuzz_app(fuzz_model, monkeypatch, caplog):
    """The gateway in-process against a fast FakeModelServer, every fetch kept off the network."""
    import logging

    caplog.set_level(logging.CRITICAL, logger="gateway")  # a warning per rejected request is noise here
    attempts = _offline_fetches(monkeypatch)
    yield gateway.create_app(gateway.Settings(tf_serving_host=fuzz_model.target, max_request_bytes=2 * MIB))
    assert attempts == [], f"the fuzz tried to connect: {attempts[:5]}"


# Derandomized: the same cases every run, so what the asserts below count does not depend on luck.
FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), print_blob=True)


def _fuzz_operation(operation, mode, examples: int, tried: collections.Counter, prepare=None, **options) -> None:
    """`examples` cases of one operation in one generation mode, each sent and checked against the document (no
    5xx, a documented status, content type and schema); `prepare` may rewrite a case before it is sent."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    strategy = operation.as_strategy(generation_mode=mode)

    @settings(FUZZ, max_examples=examples, **options)
    @given(case=strategy.map(prepare) if prepare else strategy)
    def call(case):
        response = case.call_and_validate(checks=checks)
        tried[(operation.path, mode.value, response.status_code)] += 1
        _check_answer(response.status_code, response.content, case)

    call()


@pytest.mark.timeout(120)
def test_fuzzing_the_published_openapi_never_gives_a_5xx(fuzz_app, fuzz_model):
    import schemathesis

    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)
    tried = collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/predict":  # the only operation with inputs to break
            for mode in schemathesis.GenerationMode:
                _fuzz_operation(operation, mode, 150, tried)
        else:
            _fuzz_operation(operation, schemathesis.GenerationMode.POSITIVE, 3, tried)
    print("\n" + "\n".join(f"{path} {mode:8} {status}: {n}" for (path, mode, status), n in sorted(tried.items())))
    assert sum(n for (path, _, _), n in tried.items() if path == "/predict") >= 100
    assert set(fuzz_model.signatures) == {UINT8_SIGNATURE_NAME}, "the production path: uint8 pixels"


@pytest.fixture(scope="module")
def photo_host(photo_folder):
    """The photo folder over HTTP on 127.0.0.1: a photo, a missing one, and bytes that are not an image."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    (photo_folder / "not-an-image.txt").write_text("plain text, not a photo")
    handler = functools.partial(Quiet, directory=str(photo_folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield [f"{base}/{PANTS}", f"{base}/test/pants/missing.jpg", f"{base}/not-an-image.txt"]
    server.shutdown()


def _urls_to(local_urls: list[str]):
    """A case rewriter: every URL string in the body becomes one of `local_urls`, so that the served gateway
    fetches from this machine only (the in-process fuzz above covers hostile URLs)."""

    def local(value):
        return local_urls[zlib.crc32(value.encode()) % len(local_urls)] if isinstance(value, str) else value

    def prepare(case):
        body = case.body
        if isinstance(body, dict):
            if "url" in body:
                body["url"] = local(body["url"])
            if isinstance(body.get("urls"), list):
                body["urls"] = [local(value) for value in body["urls"]]
        return case

    return prepare


@pytest.mark.timeout(400)
def test_the_served_gateway_answers_generated_requests_as_its_document_says(model_base, photo_host, tmp_path):
    """schemathesis against the gateway as production serves it (gunicorn, uvicorn workers, the admission front,
    a real model server), over HTTP, from the document the gateway serves: requests good and bad, every answer
    documented, never a 5xx. Derandomized: the same cases every run."""
    import schemathesis

    tried = collections.Counter()
    with (
        running_model_server(model_base, rest_api_port=0) as model,
        running_gateway(model.grpc_target, tmp_path, workers=2, FETCH_ALLOW_HOSTS="127.0.0.1") as gw,
    ):
        schema = schemathesis.openapi.from_url(f"{gw.url}/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()
            modes = list(schemathesis.GenerationMode)
            if operation.path != "/predict":
                modes = [schemathesis.GenerationMode.POSITIVE]
            for mode in modes:
                examples = 60 if operation.path == "/predict" else 3
                _fuzz_operation(operation, mode, examples, tried, _urls_to(photo_host))
    print("\n" + "\n".join(f"{path} {mode:8} {status}: {n}" for (path, mode, status), n in sorted(tried.items())))
    predict = {status: n for (path, _, status), n in tried.items() if path == "/predict"}
    assert sum(predict.values()) >= 60 and predict.get(200, 0) > 0 and predict.get(400, 0) > 0, predict


_URLS = st.sampled_from(
    [
        "http://example.com/shirt.jpg",
        "https://bit.ly/mlbookcamp-pants",
        "http://127.0.0.1:9696/predict",
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://0x7f000001/",
        "http://2130706433/",
        "http://user:pw@example.com/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:25/",
        "http://example.com:0/",
        "http://example.com:99999/",
        "http://ex ample.com/",
        "http://\u0000/",
        "http://xn--/",
        "http:",
        "//example.com/a.jpg",
        "",
    ]
)
_TEXT = st.text(max_size=40) | _URLS | st.sampled_from(["data:", "data:image/jpeg;base64,", "data:,AAAA", "=", "AA=="])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_FIELDS = st.sampled_from(["url", "urls", "image", "images"]) | st.text(max_size=8)


def _encode(image: Image.Image, format: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **options)
    return out.getvalue()


def _seed_images(photos) -> list[bytes]:
    """Real photos and small images in every format and mode the gateway decodes, for mutation."""
    small = Image.new("RGB", (24, 16), (200, 30, 30))
    return [
        photos[0].data,
        photos[1].data,
        _encode(small, "PNG"),
        _encode(small.convert("P"), "GIF"),
        _encode(small, "WEBP"),
        _encode(small, "BMP"),
        _encode(small, "TIFF"),
        _encode(small.convert("CMYK"), "JPEG"),
        _encode(small.convert("LA"), "PNG"),
        _encode(Image.new("I;16", (24, 16), 40000), "PNG"),
        _encode(Image.new("F", (24, 16), 0.5), "TIFF"),
    ]


@st.composite
def _mutated(draw, seeds):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        edit = draw(st.sampled_from(["set", "cut", "insert"]))
        if edit == "set" and data:
            data[position] = draw(st.integers(0, 255))
        elif edit == "cut":
            del data[position : position + draw(st.integers(1, 64))]
        else:
            data[position:position] = draw(st.binary(max_size=16))
    return bytes(data)


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the broken files it is fed
def test_fuzzing_intake_with_json_and_broken_images_never_gives_a_5xx(fuzz_app, fuzz_model, photos):
    client = fuzz_app.test_client()
    statuses = collections.Counter()

    @settings(FUZZ, max_examples=250)
    @given(
        body=st.dictionaries(_FIELDS, _JSON, max_size=4) | _JSON,
        query=st.dictionaries(st.sampled_from(["detail", "top_k"]), _TEXT, max_size=2),
    )
    def json_bodies(body, query):
        response = client.post("/predict", json=body, query_string=query)
        statuses[response.status_code] += 1
        _check_answer(response.status_code, response.data, body)

    @settings(FUZZ, max_examples=250)
    @given(data=_mutated(_seed_images(photos)), how=st.sampled_from(["raw", "multipart", "base64"]))
    def broken_images(data, how):
        if how == "raw":
            response = client.post("/predict", data=data, content_type="image/jpeg")
        elif how == "multipart":
            response = client.post("/predict", data={"image": (io.BytesIO(data), "x.jpg")})
        else:
            response = client.post("/predict", json={"images": [base64.b64encode(data).decode()]})
        statuses[response.status_code] += 1
        _check_answer(response.status_code, response.data, data[:64])

    json_bodies()
    broken_images()
    print(f"\n{dict(sorted(statuses.items()))}")
    assert statuses[200] > 0 and statuses[400] > 0  # the fuzz reached both the model and the checks
    assert set(fuzz_model.signatures) == {UINT8_SIGNATURE_NAME}, "the production path: uint8 pixels"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('{"image": "data:image/png;base64"}', id="data-url-without-comma"),
        pytest.param("[" * 2000 + "]" * 2000, id="json-nested-2000-deep"),
    ],
)
def test_what_the_fuzz_found_is_a_400(fuzz_app, body):
    """Bodies that once made the intake fail with a 500 (an IndexError, a RecursionError)."""
    response = fuzz_app.test_client().post("/predict", data=body, content_type="application/json")
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_request"


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height pixels, with (almost) no pixel data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _nasty_requests(photo: bytes) -> dict:
    """The worst of what the fuzz sends, as requests.request() keyword arguments, by name."""
    jpeg = {"Content-Type": "image/jpeg"}
    big = Image.new("RGB", (4000, 4000), (10, 200, 10))
    return {
        "truncated-jpeg": {"data": photo[: len(photo) // 2], "headers": jpeg},
        "jpeg-header-only": {"data": photo[:64], "headers": jpeg},
        "empty-jpeg": {"data": b"", "headers": jpeg},
        "png-bomb": {"data": _png_bomb(100_000, 100_000), "headers": {"Content-Type": "image/png"}},
        "16-megapixel-png": {"data": _encode(big, "PNG"), "headers": {"Content-Type": "image/png"}},
        "over-the-body-limit": {"data": b"\xff" * (3 * MIB), "headers": jpeg},
        "17-files": {"files": {f"f{i}": ("x.jpg", photo, "image/jpeg") for i in range(17)}},
        "garbage-base64": {"json": {"images": ["!!!!", "QUJD", "data:,@@"]}},
        "json-nested-2000-deep": {"data": "[" * 2000 + "]" * 2000, "headers": {"Content-Type": "application/json"}},
        "invalid-utf8-json": {"data": b'{"url": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}},
        "long-url": {"json": {"url": "http://10.0.0.1/" + "a" * 500_000}},
        "blocked-addresses": {
            "json": {
                "urls": [
                    "http://127.0.0.1:1/x.jpg",
                    "http://[::1]/x.jpg",
                    "http://169.254.169.254/latest/meta-data/",
                    "http://0.0.0.0/",
                    "http://192.0.2.1/x.jpg",
                    "http://[::ffff:10.0.0.1]/",
                ]
            }
        },
        "not-http": {"json": {"urls": ["file:///etc/passwd", "gopher://127.0.0.1/", "ftp://10.0.0.1/x.jpg"]}},
        "credentials-and-control-characters": {"json": {"urls": ["http://u:p@10.0.0.1/", "http://10.0.0.1/\r\nX: y"]}},
        "top-k-huge": {"params": {"top_k": "9" * 100, "detail": "1"}, "data": photo, "headers": jpeg},
        "request-id-injection": {"data": photo, "headers": {**jpeg, "X-Request-ID": "a\u00e9b" + "x" * 5000}},
    }


# What each of _nasty_requests gets: (status, the gateway's error code). The 16-megapixel PNG is within the pixel
# limit, and a request id that is not sane is replaced, not refused.
NASTY_ANSWERS = {
    "truncated-jpeg": (422, "undecodable_image"),
    "jpeg-header-only": (422, "undecodable_image"),
    "empty-jpeg": (415, "unsupported_media_type"),
    "png-bomb": (413, "image_too_large"),
    "16-megapixel-png": (200, ""),
    "over-the-body-limit": (413, "request_too_large"),
    "17-files": (413, "too_many_images"),
    "garbage-base64": (400, "invalid_request"),
    "json-nested-2000-deep": (400, "invalid_request"),
    "invalid-utf8-json": (400, "invalid_request"),
    "long-url": (400, "url_blocked"),
    "blocked-addresses": (400, "url_blocked"),
    "not-http": (400, "invalid_url"),
    "credentials-and-control-characters": (400, "invalid_url"),
    "top-k-huge": (400, "invalid_request"),
    "request-id-injection": (200, ""),
}


def _refused_before_dns(url: str) -> bool:
    """Whether safe_fetch stops `url` without a DNS query: unparseable, or its host is an IP address."""
    try:
        host = urlsplit(url).hostname
        safe_fetch._parse_url(url)
    except (safe_fetch.FetchError, ValueError):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _raw_http(url: str, payload: bytes, half_close: bool) -> bytes:
    """Bytes straight onto a socket (what requests cannot send), and the first bytes of the answer (b"": the
    connection closed without one). `half_close`: say that nothing more comes (uvicorn then closes the connection
    as soon as it has nothing to answer)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return sock.recv(200)


@pytest.mark.timeout(120)
def test_a_gunicorn_worker_survives_the_nastiest_requests(photos, tmp_path):
    cases = _nasty_requests(photos[0].data)
    urls = [
        u for case in cases.values() for u in [case.get("json", {}).get("url"), *case.get("json", {}).get("urls", [])]
    ]
    assert all(_refused_before_dns(u) for u in urls if u), "a case would send a host name to DNS"

    with FakeModelServer() as model, contextlib.ExitStack() as stack:
        gw = start_gateway(stack, model.target, tmp_path, workers=1, GATEWAY_MAX_REQUEST_BYTES=str(2 * MIB))
        pids = worker_pids(gw)
        answers = {}
        for name, request in cases.items():
            response = requests.post(f"{gw.url}/predict", timeout=60, **request)
            _check_answer(response.status_code, response.content, name)
            answers[name] = (response.status_code, response.json().get("error", {}).get("code", ""))
        assert answers == NASTY_ANSWERS
        # What each gets: a 400 from the HTTP parser; nothing for a body that never came whole (the client said it
        # sends no more, so the gateway drops the request and closes); a header of 20 KB is served.
        raw = {
            "malformed-request-line": (b"GARBAGE\r\n\r\n", True, b"HTTP/1.1 400"),
            "content-length-lies": (
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
                + photos[0].data[:100],
                True,
                b"",
            ),
            "bad-chunk-size": (
                b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nab\r\n0\r\n\r\n",
                True,
                b"HTTP/1.1 400",
            ),
            "huge-header": (
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
                False,
                b"HTTP/1.1 200",
            ),
        }
        raw_answers = {name: _raw_http(gw.url, payload, half) for name, (payload, half, _) in raw.items()}
        answers |= {name: answer[:12].decode(errors="replace") for name, answer in raw_answers.items()}
        healthy = requests.get(f"{gw.url}/healthz", timeout=10).status_code
        still_works = post_photo(gw.url, photos[1]).status
        assert worker_pids(gw) == pids and all(psutil.pid_exists(p) for p in pids), "a worker died"
        log = gw.log()
    print("\n" + "\n".join(f"{name:36} {answer}" for name, answer in answers.items()))
    for name, (_, _, expected) in raw.items():
        assert raw_answers[name][: len(expected)] == expected and bool(raw_answers[name]) == bool(expected), name
    assert healthy == 200 and still_works == 200
    assert "WORKER TIMEOUT" not in log and "Worker exiting" not in log
