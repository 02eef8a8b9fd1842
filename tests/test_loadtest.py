"""loadtest.py's client against a raw HTTP server on 127.0.0.1 that answers exactly as a test tells it: answers with a
length, chunked or ending with the connection; answers that never come whole; Retry-After; the open loop's rate.
Against the real gateway: test_load_and_faults.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import pytest

import loadtest

PHOTOS = [loadtest.Photo(f"train/shirt/{n}.jpg", bytes([n]) * (20_000 + n)) for n in range(3)]
OVERLOADED = json.dumps({"error": {"code": "overloaded", "message": "at capacity"}}).encode()


def answer(status: str, body: bytes = b"{}", *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    half = len(body) // 2
    chunks = b"".join(b"%x;note=1\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:]))
    return head + chunks + b"0\r\n\r\n"


@contextlib.contextmanager
def raw_server(reply):
    """An HTTP/1.1 server on a free port: for the n-th request (from 0, after reading it whole), `reply(n)` gives
    the bytes to send, or None to close the connection without a word; b"" to answer nothing and keep it open.
    A reply that says Connection: close or lacks a length ends the connection. Yields its URL and the requests."""
    seen: list[tuple[bytes, int]] = []  # (head, body length) of each request
    loop = asyncio.new_event_loop()

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                seen.append((head, length))
                data = reply(len(seen) - 1)
                if data is None:
                    break
                writer.write(data)
                await writer.drain()
                if b"Connection: close" in data or (data and b"Length" not in data and b"chunked" not in data):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def shut_down():
        server.close()
        handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen
    finally:
        asyncio.run_coroutine_threadsafe(shut_down(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def load(url: str, count: int, loop: str, **options) -> loadtest.Summary:
    """`count` requests in a closed loop of 2 clients, or in an open loop at 100 arrivals a second."""
    if loop == "closed":
        return loadtest.run(url, PHOTOS, count, 2, **options)
    return loadtest.run(url, PHOTOS, count, rate=100, **options)


LOOPS = pytest.mark.parametrize("loop", ["closed", "open"])


@LOOPS
@pytest.mark.timeout(30)
def test_answers_with_a_length_chunked_or_ending_with_the_connection_are_read_whole(loop):
    body = json.dumps({"predictions": [{"label": "shirt"}]}).encode()
    kinds = [
        answer("200 OK", body),
        chunked(body),
        # No length: the body ends where the connection does.
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body,
    ]
    with raw_server(lambda n: kinds[n % 3]) as (url, seen):
        summary = load(url, 12, loop)
    assert summary.as_dict()["status_counts"] == {"200": 12}
    assert len(seen) == 12
    head, length = seen[0]
    assert head.startswith(b"POST /predict HTTP/1.1\r\n") and b"multipart/form-data; boundary=" in head
    assert length == len(loadtest.prepare(PHOTOS[0]).body)


@LOOPS
@pytest.mark.timeout(30)
def test_requests_without_a_whole_answer_are_counted_apart_from_answered_errors(loop):
    replies = [
        answer("503 Service Unavailable", OVERLOADED, "Retry-After: 1"),
        None,  # closed without a word
        b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 100\r\n\r\n{"pred',  # then closed, 94 bytes short
        b"SSH-2.0-OpenSSH\r\n\r\n",  # not HTTP
        answer("500 Internal Server Error", b"<html>oops</html>", "Server: elsewhere"),
        b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n{}",  # a length that is not one
    ]
    with raw_server(lambda n: replies[n % 6]) as (url, _):
        summary = load(url, 12, loop)
    d = summary.as_dict()
    assert d["sent"] == 12 and d["ok"] == 0
    assert d["shed"] == 2 and d["no_answer"] == 8
    assert d["errors"]["503 overloaded"] == 2
    assert d["errors"]["no answer (NoAnswer)"] == 8
    assert d["errors"]["500 not the gateway's JSON (elsewhere)"] == 2


@LOOPS
@pytest.mark.timeout(30)
def test_an_answer_that_never_comes_times_out_as_no_answer(loop):
    with raw_server(lambda n: b"") as (url, _):
        started = time.monotonic()
        summary = load(url, 2, loop, timeout=0.5)
    assert time.monotonic() - started < 5
    assert summary.as_dict()["errors"] == {"no answer (TimeoutError)": 2}


@LOOPS
@pytest.mark.timeout(30)
def test_a_polite_client_waits_out_retry_after_then_sends_again(loop):
    replies = [answer("503 Service Unavailable", OVERLOADED, "Retry-After: 1"), answer("200 OK")]
    with raw_server(lambda n: replies[min(n, 1)]) as (url, seen):
        summary = load(url, 1, loop, honour_retry_after=True)
    (outcome,) = summary.outcomes
    # uvloop's timers count whole milliseconds: a wait of 1 s can end a fraction of one early.
    assert outcome.status == 200 and outcome.retries == 1 and outcome.seconds >= 0.99
    assert len(seen) == 2


@pytest.mark.parametrize("outstanding", [64, 2])
@pytest.mark.timeout(30)
def test_the_open_loop_sends_at_its_rate_whatever_the_answers_take(outstanding):
    # Every answer takes 0.05 s, one after another: the server answers 20/s, the open loop sends 40/s anyway (with
    # 2 out at most, the others queue in the generator, their latency still counted from their arrival).
    delayed = answer("200 OK")

    def slow(n):
        time.sleep(0.05)  # blocks the server's loop: answers come one after another
        return delayed

    with raw_server(slow) as (url, _):
        summary = loadtest.run(url, PHOTOS, 10**6, rate=40, duration=1.2, max_outstanding=outstanding, timeout=10)
    d = summary.as_dict()
    assert 25 <= d["sent"] <= 75, d["sent"]  # Poisson arrivals at 40/s for 1.2 s: 48 expected
    assert d["no_answer"] == 0 and d["ok"] == d["sent"]
    # Latency counts from each arrival: the last ones waited for the answers queued ahead of them.
    assert max(o.seconds for o in summary.outcomes) > 0.5
