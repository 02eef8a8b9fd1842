"""Failures as the client gets them: an HTTP status that says whose fault it is, a code and a sentence.

Every error answer is `{"error": {"code": ..., "message": ...}}`: 4xx for the request, 5xx for the model tier
(502 it answered wrongly, 503 it is down or the gateway is full, 504 it did not answer in time).
"""

from __future__ import annotations

import logging

import grpc
from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from gateway_parts.metrics import ERRORS

log = logging.getLogger("gateway")

# Werkzeug's own HTTP errors (no such route, wrong method, body over MAX_CONTENT_LENGTH) under the gateway's codes.
_HTTP_CODES = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}


class GatewayError(Exception):
    """A failure with the HTTP status and machine-readable code the client gets."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def model_error(error: grpc.RpcError, target: str) -> GatewayError:
    """A gRPC failure of the model tier as the gateway's answer."""
    status, details = error.code(), error.details() or ""
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError(504, "model_timeout", f"the model server at {target} did not answer in time")
    if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return GatewayError(
            503,
            "model_unavailable",
            f"the model server at {target} is unavailable ({details}); retry shortly",
            {"Retry-After": "1"},
        )
    return GatewayError(502, "model_error", f"the model server at {target} answered {status.name}: {details}")


def error_response(error: GatewayError):
    """The JSON answer to a failed request, counted by code and logged with the request's id."""
    ERRORS.labels(error.code).inc()
    log.warning(
        "request %s %s %s -> %d %s: %s",
        g.get("request_id"),
        request.method,
        request.path,
        error.status,
        error.code,
        error.message,
    )
    response = jsonify(error={"code": error.code, "message": error.message})
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def answer_errors_as_json(app: Flask) -> None:
    """Make every failure of `app` a JSON error answer: the gateway's own, werkzeug's, and unexpected ones (500,
    logged with their traceback)."""

    @app.errorhandler(GatewayError)
    def gateway_error(error):
        return error_response(error)

    @app.errorhandler(HTTPException)
    def http_error(error):
        code = _HTTP_CODES.get(error.code, "invalid_request")
        return error_response(GatewayError(error.code or 400, code, error.description or error.name))

    @app.errorhandler(Exception)
    def unexpected(error):
        log.exception("request %s: unexpected failure", g.get("request_id"))
        message = f"unexpected failure; request id {g.get('request_id')}"
        return error_response(GatewayError(500, "internal_error", message))
