"""The plumbing between the ASGI front and the Flask app: a request whose body has been read becomes a WSGI
environ (PEP 3333's keys), the Flask app is called with it in a worker thread, and answers are (status, headers,
body) triples with headers as ASGI wants them (lower-case bytes)."""

from __future__ import annotations

import io
import json
import sys


def json_answer(status: int, code: str, message: str, request_id: str, headers=()):
    """The gateway's JSON error answer, made without Flask (for requests the front answers itself)."""
    body = (json.dumps({"error": {"code": code, "message": message}}) + "\n").encode()
    return (
        status,
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
            *headers,
        ],
        body,
    )


def wsgi_environ(scope, body: bytes) -> dict:
    """The WSGI environ of an ASGI HTTP request whose body has been read."""
    server = scope.get("server") or ("localhost", 80)
    environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode().decode("latin-1"),
        "PATH_INFO": scope["path"].encode().decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "REMOTE_ADDR": (scope.get("client") or ("", 0))[0],
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").upper().replace("-", "_"), raw_value.decode("latin-1")
        if name == "CONTENT_TYPE":
            environ[name] = value
        elif name not in ("CONTENT_LENGTH", "TRANSFER_ENCODING"):
            key = f"HTTP_{name}"
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def call_wsgi(app, environ: dict):
    """Call a WSGI app (in a worker thread): its status, headers and whole body."""
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = int(status.split(" ", 1)[0]), headers

    chunks = app(environ, start_response)
    try:
        body = b"".join(chunks)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in answer["headers"]]
    return answer["status"], headers, body
