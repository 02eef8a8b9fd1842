"""The ASGI app that gunicorn's uvicorn workers serve: HTTP is parsed and answered in an asyncio event loop,
admission runs there, and the Flask app runs in threads, GATEWAY_MAX_INFLIGHT of them for POST /predict.

A request's body is read in full before it waits or works, so no thread ever waits on a client. A POST /predict
that would be refused anyway is answered from its head, before its body is read: uvicorn then reads the body and
drops it, so the connection stays ready for the next request. A shed request never reaches Flask.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent import futures

from flask import Flask

from gateway_parts.admission import Admission
from gateway_parts.asgi import call_wsgi, json_answer, wsgi_environ
from gateway_parts.intake import request_id
from gateway_parts.metrics import ERRORS, REQUESTS, WAITING
from gateway_parts.refusals import Refusals
from gateway_parts.settings import Settings

log = logging.getLogger("gateway")
ACCESS_LOG = logging.getLogger("gateway.access")  # one line per request; gunicorn.conf.py sends it to the access log
# Threads per process for everything but POST /predict (the page, health, readiness, metrics): they never wait
# behind predictions.
OTHER_THREADS = 4
# The request head's fields the front reads (ASGI gives header names lower-case).
_HEAD_FIELDS = frozenset({b"content-length", b"x-request-id", b"expect"})


class _ClientGone(Exception):
    """The client closed the connection before its request was whole."""


# Where the front tells Flask when a request arrived and when it was let in (time.perf_counter()).
ARRIVED, ADMITTED = "gateway.arrived", "gateway.admitted"


def admission_times(environ: dict, default: float) -> tuple[float, float]:
    """When the request reached the front, and when the front let it through to Flask; without the front (Flask's
    test client, or another server), both are `default`: the request waited nowhere."""
    return environ.get(ARRIVED, default), environ.get(ADMITTED, default)


class Front:
    """The gateway's ASGI app, around the Flask `app` (made by gateway.create_app, which holds its settings).
    Waiting requests keep their bodies in memory, at most 2 x GATEWAY_MAX_REQUEST_BYTES of them per process; past
    that, a new one is shed."""

    def __init__(self, app: Flask):
        self.app = app
        self.settings: Settings = app.extensions["gateway"]["settings"]
        s = self.settings
        self.admission = Admission(s.max_inflight, s.queue_budget, 2 * s.max_request_bytes, gauge=WAITING)
        self.refusals = Refusals(self.admission, s)
        self._predict = futures.ThreadPoolExecutor(s.max_inflight, thread_name_prefix="predict")
        self._other = futures.ThreadPoolExecutor(OTHER_THREADS, thread_name_prefix="http")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # gunicorn.conf.py turns the lifespan protocol off; websockets are not served
            return
        arrived = time.perf_counter()
        try:
            status, headers, answer = await self._answer(scope, receive, arrived)
        except _ClientGone:
            return
        if self._draining() and not any(name == b"connection" for name, _ in headers):
            # Keep-alive clients stay with this pod after it leaves the Service: this sends them to another.
            headers = [*headers, (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})
        self._log_access(scope, status, headers, len(answer), arrived)

    def _draining(self) -> bool:
        """Whether the pod is stopping: its preStop hook created the drain file (one stat a request)."""
        return bool(self.settings.drain_file) and os.path.exists(self.settings.drain_file)

    async def _answer(self, scope, receive, arrived: float):
        head = {name: value for name, value in scope["headers"] if name in _HEAD_FIELDS}
        length, rid = head.get(b"content-length", b""), request_id(head.get(b"x-request-id", b"").decode("latin-1"))
        predict = scope["path"] == "/predict" and scope["method"] == "POST"
        if predict and self._refused_from_head(length, head, arrived):
            return self.refusals.refusal(rid)
        body = await self._read_body(receive, length)
        if body is None:
            return self._too_large(rid, "/predict" if predict else "unmatched")
        if predict:
            return await self._predict_request(scope, body, arrived, rid)
        return await self._call_flask(self._other, scope, body, rid, {})

    def _refused_from_head(self, length: bytes, head: dict, arrived: float) -> bool:
        """Whether a POST /predict is refused before its body is read: it would get no place in the queue, and a
        refusal may go out at once. A client that sent `Expect: 100-continue` is holding its body back; reading the
        body (which sends the 100) keeps its connection in step, so it takes the usual way."""
        size = int(length) if length.isdigit() else 0
        if size > self.settings.max_request_bytes or head.get(b"expect", b"").lower() == b"100-continue":
            return False
        if not self.admission.full(arrived, size) or not self.refusals.at_once():
            return False
        self.admission.refused()
        return True

    async def _read_body(self, receive, length: bytes) -> list[bytes] | None:
        """The whole body, as the pieces it came in (a refused request's are never joined), or None if it is larger
        than GATEWAY_MAX_REQUEST_BYTES (then its answer closes the connection: the rest of the body is unread)."""
        limit = self.settings.max_request_bytes
        if length.isdigit() and int(length) > limit:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return chunks

    async def _predict_request(self, scope, body: list[bytes], arrived: float, rid: str):
        granted = await self.admission.enter(arrived, sum(map(len, body)))
        if granted is None:
            return await self.refusals.answer(arrived, rid)
        extra = {ARRIVED: arrived, ADMITTED: granted}
        try:
            return await self._call_flask(self._predict, scope, body, rid, extra)
        finally:
            self.admission.leave(time.perf_counter() - granted)

    async def _call_flask(self, pool, scope, body: list[bytes], rid: str, extra: dict):
        environ = wsgi_environ(scope, b"".join(body))
        environ.update(extra)
        environ["HTTP_X_REQUEST_ID"] = rid  # one id per request: Flask keeps the one the front chose
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, call_wsgi, self.app, environ)
        except Exception:  # Flask answers its own errors; this is a failure around it
            log.exception("request %s: unexpected failure outside the app", rid)
            return json_answer(500, "internal_error", f"unexpected failure; request id {rid}", rid)

    def _too_large(self, rid: str, endpoint: str):
        limit = self.settings.max_request_bytes
        message = f"the request body is larger than {limit} bytes (GATEWAY_MAX_REQUEST_BYTES)"
        ERRORS.labels("request_too_large").inc()
        REQUESTS.labels(endpoint, "413").inc()
        # The rest of the body was not read: the connection cannot carry another request.
        return json_answer(413, "request_too_large", message, rid, [(b"connection", b"close")])

    @staticmethod
    def _log_access(scope, status: int, headers, size: int, arrived: float) -> None:
        if not ACCESS_LOG.isEnabledFor(logging.INFO):
            return
        client = (scope.get("client") or ("-", 0))[0]
        query = scope["query_string"].decode("latin-1")
        target = scope["path"] + (f"?{query}" if query else "")
        rid = next((v.decode("latin-1") for k, v in headers if k == b"x-request-id"), "-")
        milliseconds = round((time.perf_counter() - arrived) * 1000)
        line = f'"{scope["method"]} {target} HTTP/{scope["http_version"]}" {status} {size} {milliseconds}ms'
        ACCESS_LOG.info("%s %s rid=%s", client, line, rid)
