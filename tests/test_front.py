"""The gateway's front (gateway_parts: admission, refusals and front, the ASGI app gunicorn serves): admission by
queueing delay in the event loop, shed requests, bodies, the access log, and Flask in threads, driven in-process
through the ASGI interface with a stand-in model client; then the same front under a real uvicorn configured as
gunicorn.conf.py's worker, on the wire: refusals from the head, keep-alive, pipelining, HTTP/1.0, 100-continue.
Under a real gunicorn: test_load_and_faults.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import runpy
import socket
import threading
import time
from types import SimpleNamespace

import prometheus_client
import pytest
import uvicorn
from test_gateway import RED, FakeModel

import gateway
from conftest import ROOT
from gateway_parts import refusals
from gateway_parts.admission import Admission
from gateway_parts.front import Front
from gateway_parts.settings import Settings

BODY = json.dumps({"image": base64.b64encode(RED).decode()}).encode()


async def call(app, method: str = "POST", path: str = "/predict", body: bytes = BODY, headers=(), chunk=None):
    """One HTTP request through an ASGI app, as uvicorn makes it: its answer, how long it took, and how many
    times the app read from the request (`reads`)."""
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk and body else [body]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gateway"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 9696),
    }
    sent, reads = [], []

    async def receive():
        reads.append(1)
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # a client that never disconnects

    async def send(message):
        sent.append(message)

    started = time.perf_counter()
    await app(scope, receive, send)
    start, whole = sent
    answer_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    seconds = time.perf_counter() - started
    return SimpleNamespace(
        status=start["status"], headers=answer_headers, body=whole["body"], seconds=seconds, reads=len(reads)
    )


async def until(condition, timeout: float = 30) -> None:
    """Wait, in the event loop, until `condition()` holds (a bounded poll, not a guess at how long it takes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the scenario to get there"
        await asyncio.sleep(0.002)


def front(fake, **settings) -> Front:
    return Front(gateway.create_app(Settings(**settings), client=fake))


@pytest.fixture
def fake():
    return FakeModel()


# ---- admission ------------------------------------------------------------------------------------


def test_admission_hands_slots_to_the_waiters_in_arrival_order():
    async def scenario():
        admission = Admission(limit=1, budget=5.0)
        assert await admission.enter(time.perf_counter()) is not None  # working
        first = asyncio.create_task(admission.enter(time.perf_counter()))
        second = asyncio.create_task(admission.enter(time.perf_counter()))
        await asyncio.sleep(0.01)
        assert admission.waiting() == 2
        admission.leave(0.01)
        await asyncio.sleep(0.01)
        assert first.done() and first.result() is not None and not second.done()  # the oldest, and only it
        admission.leave(0.01)
        assert await second is not None and admission.waiting() == 0

    asyncio.run(scenario())


def test_under_overload_the_queue_is_short_and_served_newest_first():
    """Overload: a tenth of the recent arrivals refused. Then the slots stay busy with any queue, so a short one
    served newest first keeps the served requests' wait short; the oldest waiters are the ones shed."""

    async def scenario():
        admission = Admission(limit=1, budget=0.5)
        assert await admission.enter(time.perf_counter()) is not None  # working

        async def waiters(count):
            tasks = []
            for _ in range(count):
                tasks.append(asyncio.create_task(admission.enter(time.perf_counter())))
                await asyncio.sleep(0.002)
            return tasks

        queued = await waiters(11)  # 12 arrivals
        assert await admission.enter(time.perf_counter() - 0.6) is None  # its budget was spent before it asked
        assert not admission.overloaded()  # 1 refused of 13
        admission.leave(0.01)  # a slot is held 10 ms: the short queue (0.05 s) is 5 waiters
        await asyncio.sleep(0.005)
        assert [t.done() for t in queued] == [True] + [False] * 10  # arrival order
        assert await admission.enter(time.perf_counter() - 0.6) is None
        assert admission.overloaded()  # 2 of 14
        admission.leave(0.01)
        await asyncio.sleep(0.005)
        assert [t.result() for t in queued[1:6]] == [None] * 5  # the oldest, past the short queue: shed
        assert queued[-1].done() and queued[-1].result() is not None  # the newest
        assert [t.done() for t in queued[6:10]] == [False] * 4
        # 4 waiters, 0.05 s ahead of it; 0.04 s left of its short budget (0.49 s of the whole): refused.
        assert await admission.enter(time.perf_counter() - 0.01) is None
        for _ in range(4):
            admission.leave(0.01)
        assert None not in await asyncio.gather(*queued[6:])
        admission.leave(0.01)
        refused = time.monotonic()
        await asyncio.sleep(max(0.0, refused + 1.05 - time.monotonic()))
        assert not admission.overloaded()  # two budgets later the refusals no longer count
        assert await admission.enter(time.perf_counter()) is not None
        d, e = await waiters(2)
        admission.leave(0.01)
        await asyncio.sleep(0.005)
        assert d.done() and not e.done()  # arrival order again
        admission.leave(0.01)
        assert await e is not None

    asyncio.run(scenario())


def test_admission_sheds_a_waiter_whose_budget_runs_out_and_keeps_its_order():
    async def scenario():
        admission = Admission(limit=1, budget=0.2)
        assert await admission.enter(time.perf_counter()) is not None
        started = time.monotonic()
        assert await admission.enter(time.perf_counter()) is None
        assert 0.15 <= time.monotonic() - started < 2 and admission.waiting() == 0
        # Not a refusal on arrival: newest first, the oldest waiters run out of budget, and counting them would
        # keep the gateway overloaded.
        assert not admission.overloaded()
        admission.leave(0.01)
        assert await admission.enter(time.perf_counter()) is not None  # the slot came back

    asyncio.run(scenario())


def test_admission_refuses_at_once_what_could_not_start_in_time():
    async def scenario():
        admission = Admission(limit=1, budget=0.5)
        assert await admission.enter(time.perf_counter()) is not None
        admission.leave(2.0)  # requests have been holding a slot for 2 s
        assert await admission.enter(time.perf_counter()) is not None
        started = time.monotonic()
        assert await admission.enter(time.perf_counter()) is None  # 2 s ahead of it, 0.5 s of budget: refused
        assert time.monotonic() - started < 0.1
        assert admission.predicted_wait() == pytest.approx(2.0)
        # The budget counts from arrival: a request that already spent it before asking is refused too.
        fast = Admission(limit=1, budget=0.5)
        assert await fast.enter(time.perf_counter()) is not None
        assert await fast.enter(time.perf_counter() - 0.6) is None

    asyncio.run(scenario())


def test_admission_never_grants_a_slot_past_the_budget():
    """A waiter whose budget ran out while the slot was busy is shed, and the slot goes to the next in line."""

    async def scenario():
        admission = Admission(limit=1, budget=10.0)
        assert await admission.enter(time.perf_counter()) is not None
        late = asyncio.create_task(admission.enter(time.perf_counter() - 9.8))  # 0.2 s of budget left
        fresh = asyncio.create_task(admission.enter(time.perf_counter()))
        assert await asyncio.wait_for(late, 5) is None  # shed when its budget ran out, with the slot still busy
        admission.leave(0.01)
        assert await fresh is not None and admission.waiting() == 0

    asyncio.run(scenario())


def test_admission_bounds_the_memory_its_waiters_hold_and_counts_them():
    class Gauge:
        value = 0

        def inc(self):
            self.value += 1

        def dec(self):
            self.value -= 1

    async def scenario():
        gauge = Gauge()
        admission = Admission(limit=1, budget=5.0, max_waiting_bytes=100, gauge=gauge)
        assert await admission.enter(time.perf_counter(), 1000) is not None  # working: its body is not counted
        waiter = asyncio.create_task(admission.enter(time.perf_counter(), 60))
        await asyncio.sleep(0.01)
        assert gauge.value == 1
        assert await admission.enter(time.perf_counter(), 60) is None  # 120 bytes would wait: shed at once
        assert await asyncio.wait_for(admission.enter(time.perf_counter() - 4.99, 40), 1) is None  # fits; expires
        admission.leave(0.01)
        assert await waiter is not None and gauge.value == 0

    asyncio.run(scenario())


def test_a_waiter_dropped_while_it_waits_gives_its_place_back():
    async def scenario():
        admission = Admission(limit=1, budget=10.0)
        assert await admission.enter(time.perf_counter()) is not None
        dropped = asyncio.create_task(admission.enter(time.perf_counter()))
        await asyncio.sleep(0.01)
        dropped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dropped
        assert admission.waiting() == 0
        admission.leave(0.01)
        assert await admission.enter(time.perf_counter()) is not None  # the slot is free, not lost

    asyncio.run(scenario())


# ---- the front ------------------------------------------------------------------------------------


def test_a_request_that_cannot_start_in_time_is_shed_when_its_budget_is_spent(fake, monkeypatch):
    monkeypatch.setattr(refusals, "FAST_REFUSAL_BURST", 0.0)  # past the rate of refusals sent at once
    app = front(fake, max_inflight=1, queue_budget=0.2)
    fake.release.clear()

    async def scenario():
        first = asyncio.create_task(call(app))
        await until(lambda: fake.entered == 1)
        shed = await call(app, headers=[(b"x-request-id", b"shed-1")])
        fake.release.set()
        return await first, shed, await call(app)

    first, shed, after = asyncio.run(scenario())
    assert first.status == 200 and after.status == 200
    assert shed.status == 503 and json.loads(shed.body)["error"]["code"] == "overloaded"
    assert shed.headers["retry-after"] == "1" and shed.headers["x-request-id"] == "shed-1"
    # Past the rate of refusals sent at once, answered when its budget was spent: an eager client cannot loop on
    # instant refusals.
    assert shed.seconds >= 0.15


def test_refusals_go_out_at_once_up_to_a_rate_and_past_it_when_their_budget_is_spent(fake, monkeypatch):
    monkeypatch.setattr(refusals, "FAST_REFUSAL_BURST", 3.0)
    monkeypatch.setattr(refusals, "FAST_REFUSALS_PER_SECOND", 0.5)  # no token comes back within the test
    app = front(fake, max_inflight=1, queue_budget=0.3)
    fake.release.clear()

    async def scenario():
        await app.admission.enter(time.perf_counter())
        app.admission.leave(2.0)  # requests have been holding a slot for 2 s: a new one is refused on arrival
        first = asyncio.create_task(call(app))
        await until(lambda: fake.entered == 1)
        shed = await asyncio.gather(*[call(app) for _ in range(5)])
        fake.release.set()
        return await first, shed

    first, shed = asyncio.run(scenario())
    assert first.status == 200 and [answer.status for answer in shed] == [503] * 5
    seconds = sorted(answer.seconds for answer in shed)
    # The burst of three at once, the other two held to the end of their budget (0.3 s): most of it lies between.
    assert seconds[3] >= 0.25 and seconds[3] - seconds[2] >= 0.15, seconds


def test_waiting_requests_hold_no_thread(fake):
    app = front(fake, max_inflight=1, queue_budget=10.0)
    fake.release.clear()

    async def scenario():
        tasks = [asyncio.create_task(call(app)) for _ in range(30)]
        await until(lambda: fake.entered == 1 and app.admission.waiting() == 29)
        waiting, threads = app.admission.waiting(), threading.active_count()
        fake.release.set()
        return waiting, threads, await asyncio.gather(*tasks)

    before = threading.active_count()
    waiting, threads, answers = asyncio.run(scenario())
    assert waiting == 29 and [a.status for a in answers] == [200] * 30
    assert threads - before <= 1, "one predict thread works; the 29 waiting requests hold none"


def test_health_and_metrics_never_wait_behind_predictions(fake):
    app = front(fake, max_inflight=1, queue_budget=10.0)
    fake.release.clear()

    async def scenario():
        busy = [asyncio.create_task(call(app)) for _ in range(3)]
        await until(lambda: fake.entered == 1 and app.admission.waiting() == 2)
        # Answered while the predictions are held: had they waited behind them, they would time out here.
        health = await asyncio.wait_for(call(app, "GET", "/healthz", b""), 30)
        metrics = await asyncio.wait_for(call(app, "GET", "/metrics", b""), 30)
        fake.release.set()
        await asyncio.gather(*busy)
        return health, metrics

    health, metrics = asyncio.run(scenario())
    assert health.status == 200
    assert metrics.status == 200 and b"gateway_waiting_requests" in metrics.body


def test_a_body_over_the_limit_is_refused_and_the_connection_closes(fake):
    app = front(fake, max_request_bytes=1000)

    async def scenario():
        declared = await call(app, body=b"x" * 2000, headers=[(b"content-length", b"2000")])
        chunked = await call(app, body=b"x" * 2000, chunk=300)  # no Content-Length: counted as it comes
        return declared, chunked

    for answer in asyncio.run(scenario()):
        assert answer.status == 413 and json.loads(answer.body)["error"]["code"] == "request_too_large"
        assert answer.headers["connection"] == "close" and len(answer.headers["x-request-id"]) == 32
    assert not fake.batches


def test_a_body_in_chunks_reaches_flask_whole(fake):
    answer = asyncio.run(call(front(fake), body=BODY, chunk=7))
    assert answer.status == 200 and json.loads(answer.body)["pants"] == 5.0


def test_the_answers_carry_the_request_id_and_flask_errors_pass_through(fake):
    app = front(fake)

    async def scenario():
        kept = await call(app, headers=[(b"x-request-id", b"abc-123")])
        bad = await call(app, body=b"{not json")
        missing = await call(app, "GET", "/nowhere", b"")
        return kept, bad, missing

    kept, bad, missing = asyncio.run(scenario())
    assert kept.status == 200 and kept.headers["x-request-id"] == "abc-123"
    assert bad.status == 400 and json.loads(bad.body)["error"]["code"] == "invalid_request"
    assert missing.status == 404 and json.loads(missing.body)["error"]["code"] == "not_found"


def test_one_access_log_line_per_request_with_status_time_and_request_id(fake, caplog):
    app = front(fake, max_inflight=1, queue_budget=0.05)
    fake.release.clear()

    async def scenario():
        first = asyncio.create_task(call(app, headers=[(b"x-request-id", b"a" * 32)]))
        await until(lambda: fake.entered == 1)
        await call(app, headers=[(b"x-request-id", b"b" * 32)])  # shed
        fake.release.set()
        await first

    with caplog.at_level(logging.INFO, logger="gateway.access"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    # The shape tests/engine.py reads in the containers' logs (the request line, status, then the request id).
    found = {
        rid: status
        for status, rid in re.findall(r'"POST /predict[^"]*" (\d{3}) .* rid=([0-9a-f]{32})', "\n".join(lines))
    }
    assert found == {"b" * 32: "503", "a" * 32: "200"}
    assert all(re.match(r'127\.0\.0\.1 "POST /predict HTTP/1\.1" \d{3} \d+ \d+ms rid=', line) for line in lines)


def full_front(fake, **settings) -> Front:
    """A front whose one slot is busy, after requests held it for 2 s each: a new POST /predict would get no place
    in the queue."""
    app = front(fake, **{"max_inflight": 1, "queue_budget": 0.5, **settings})
    asyncio.run(app.admission.enter(time.perf_counter()))  # a free slot is granted at once, with no loop kept
    app.admission.leave(2.0)
    asyncio.run(app.admission.enter(time.perf_counter()))
    return app


def test_a_prediction_that_would_be_refused_is_answered_from_its_head_and_counted_like_any_refusal(fake, caplog):
    app = full_front(fake)
    caplog.set_level(logging.INFO, logger="gateway.access")
    before = shed_count()
    head = [(b"content-length", str(len(BODY)).encode()), (b"x-request-id", b"early-1")]

    async def scenario():
        health = await call(app, "GET", "/healthz", b"")  # only predictions are shed
        too_large = [(b"content-length", str(app.settings.max_request_bytes + 1).encode())]
        large = await call(app, body=b"x", headers=too_large)  # answered 413, and the connection closes
        assert not app.admission.overloaded()
        return health, large, await call(app, headers=head)

    health, large, refused = asyncio.run(scenario())
    assert health.status == 200 and large.status == 413
    assert refused.status == 503 and refused.reads == 0, "answered before its body was read"
    error = json.loads(refused.body)["error"]
    assert error["code"] == "overloaded" and "could not start within 0.05 s" in error["message"]  # 1 in 2: overload
    assert refused.headers["retry-after"] == "2" and refused.headers["x-request-id"] == "early-1"
    assert refused.headers["content-length"] == str(len(refused.body))
    assert app.admission.overloaded() and shed_count() == before + 1 and not fake.batches
    lines = [r.getMessage() for r in caplog.records if "early-1" in r.getMessage()]
    assert len(lines) == 1 and re.fullmatch(
        rf'127\.0\.0\.1 "POST /predict HTTP/1\.1" 503 {len(refused.body)} \d+ms rid=early-1', lines[0]
    )


def test_past_the_rate_of_refusals_sent_at_once_a_prediction_is_read_and_its_refusal_held(fake, monkeypatch):
    monkeypatch.setattr(refusals, "FAST_REFUSAL_BURST", 0.0)
    app = full_front(fake, queue_budget=0.2)
    answer = asyncio.run(call(app))
    assert answer.status == 503 and answer.reads == 1 and answer.seconds >= 0.15


def test_a_prediction_that_expects_100_continue_is_read_before_it_is_refused(fake):
    """Its client may hold the body back until it hears 100 Continue; reading the body sends it."""
    answer = asyncio.run(call(full_front(fake), headers=[(b"expect", b"100-continue")]))
    assert answer.status == 503 and answer.reads == 1


def shed_count() -> float:
    return prometheus_client.REGISTRY.get_sample_value("gateway_errors_total", {"code": "overloaded"}) or 0.0


# ---- the front under a real uvicorn, with gunicorn.conf.py's worker settings ------------------------------

GUNICORN_CONF = runpy.run_path(str(ROOT / "gunicorn.conf.py"))


@contextlib.contextmanager
def serving(app: Front):
    """`app` under uvicorn, as gunicorn.conf.py's worker configures it, on a free port (yielded)."""
    config = uvicorn.Config(app, **GUNICORN_CONF["GatewayWorker"].CONFIG_KWARGS, log_level="warning")
    server = uvicorn.Server(config)
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


@pytest.fixture
def served_front(fake):
    """A full front (see full_front) under uvicorn, on a free port."""
    app = full_front(fake)
    with serving(app) as port:
        yield SimpleNamespace(app=app, port=port)


def read_answer(connection: socket.socket, buffer: bytearray) -> tuple[int, dict, bytes]:
    """One HTTP answer (with a Content-Length) from `connection`; bytes past it stay in `buffer`."""
    while b"\r\n\r\n" not in buffer:
        data = connection.recv(65536)
        assert data, f"the connection closed before an answer: {bytes(buffer)!r}"
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    size = int(headers.get("content-length", 0))
    while len(rest) < size:
        data = connection.recv(65536)
        assert data, "the connection closed inside an answer"
        rest += data
    buffer[:] = rest[size:]
    return int(status_line.split()[1]), headers, rest[:size]


def http(method: str, path: str, body: bytes = b"", version: str = "1.1", extra: bytes = b"") -> bytes:
    return (
        b"%s %s HTTP/%s\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
        % (method.encode(), path.encode(), version.encode(), len(body), extra)
        + body
    )


def code_of(answer: bytes) -> str:
    return json.loads(answer)["error"]["code"]


def test_a_refusal_from_the_head_drops_the_body_and_keeps_the_connection(served_front, fake):
    body = b'{"image": "' + b"A" * 65536 + b'"}'  # 64 KiB, sent after the head, in pieces
    with socket.create_connection(("127.0.0.1", served_front.port), timeout=10) as connection:
        buffer = bytearray()
        request = http("POST", "/predict", body)
        head_size = request.index(b"\r\n\r\n") + 4
        connection.sendall(request[:head_size])
        status, headers, answer = read_answer(connection, buffer)  # answered before any of the body came
        assert status == 503 and code_of(answer) == "overloaded" and headers["content-type"] == "application/json"
        assert "date" in headers and "connection" not in headers  # uvicorn's own headers, and kept alive
        for start in range(head_size, len(request), 16384):
            connection.sendall(request[start : start + 16384])
            time.sleep(0.01)
        connection.sendall(http("GET", "/healthz"))
        status, _, answer = read_answer(connection, buffer)
        assert (status, json.loads(answer)) == (200, {"status": "ok"})
    assert not fake.batches  # the refused request never reached the model


def test_pipelined_requests_are_answered_in_order(served_front):
    chunked = b"POST /predict HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    requests = http("POST", "/predict", b"x" * 1000) + http("GET", "/healthz") + http("POST", "/predict")
    with socket.create_connection(("127.0.0.1", served_front.port), timeout=10) as connection:
        connection.sendall(requests + http("GET", "/nowhere") + chunked + http("GET", "/healthz"))
        buffer = bytearray()
        answers = [read_answer(connection, buffer) for _ in range(6)]
    assert [status for status, _, _ in answers] == [503, 200, 503, 404, 503, 200]
    assert [code_of(body) for status, _, body in answers if status >= 400] == ["overloaded"] * 2 + ["not_found"] + [
        "overloaded"
    ]


def test_an_http_1_0_connection_is_closed_after_a_refusal(served_front):
    with socket.create_connection(("127.0.0.1", served_front.port), timeout=10) as connection:
        connection.sendall(http("POST", "/predict", b"x" * 100, version="1.0"))
        buffer = bytearray()
        status, headers, _ = read_answer(connection, buffer)
        assert status == 503 and headers["connection"] == "close"
        assert connection.recv(100) == b""  # closed by the server


def test_a_client_that_expects_100_continue_hears_it_then_its_answer(served_front):
    with socket.create_connection(("127.0.0.1", served_front.port), timeout=10) as connection:
        request = http("POST", "/predict", b"y" * 50, extra=b"expect: 100-continue\r\n")
        head_size = request.index(b"\r\n\r\n") + 4
        connection.sendall(request[:head_size])
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            buffer += connection.recv(65536)
        assert bytes(buffer).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        del buffer[: len(b"HTTP/1.1 100 Continue\r\n\r\n")]
        connection.sendall(request[head_size:])
        status, _, answer = read_answer(connection, buffer)
        assert status == 503 and code_of(answer) == "overloaded"
        connection.sendall(http("GET", "/healthz"))
        assert read_answer(connection, buffer)[0] == 200


def test_while_the_drain_file_exists_every_answer_closes_its_connection(fake, tmp_path):
    """The gateway's preStop hook creates the drain file: from then on each answer says `Connection: close` and
    the connection closes after it, so keep-alive clients (which stay with this pod after it left the Service)
    reconnect, through the Service, to a pod that is not stopping, before SIGTERM closes idle connections."""
    drain = tmp_path / "draining"
    with serving(front(fake, drain_file=str(drain))) as port, socket.create_connection(("127.0.0.1", port), 10) as c:
        buffer = bytearray()
        c.sendall(http("GET", "/healthz"))
        status, headers, _ = read_answer(c, buffer)
        assert status == 200 and "connection" not in headers  # kept alive
        drain.touch()
        c.sendall(http("GET", "/healthz"))
        status, headers, _ = read_answer(c, buffer)
        assert status == 200 and headers["connection"] == "close"
        assert c.recv(100) == b""  # closed by the server
