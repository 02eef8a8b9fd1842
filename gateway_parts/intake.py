"""What a request brings: its images (URLs, base64 or uploaded files) and its id.

The course's gateway reads `request.get_json()["url"]`; this gateway also takes the photo itself, several photos
at once, and refuses anything else with a 400 that says what to send.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid

from flask import request

from gateway_parts.errors import GatewayError

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_FIELDS = {"url", "urls", "image", "images"}
_HOW = 'send JSON like {"url": "https://…/photo.jpg"} or {"image": "<base64>"}, or upload the image file'


def request_id(given: str) -> str:
    """The client's X-Request-ID if it is a sane one (it goes into logs and headers), else a new one."""
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def images_in_request(max_images: int) -> list[tuple[str, object]]:
    """The current Flask request's images as (kind, value), in order: ("url", str) or ("bytes", bytes)."""
    if request.files:
        items = [("bytes", f.read()) for f in request.files.values()]
    elif request.mimetype and request.mimetype.startswith("image/"):
        items = [("bytes", request.get_data())]
    else:
        items = _images_in_json(_json_body())
    if not items:
        raise GatewayError(400, "invalid_request", "the request holds no image")
    if len(items) > max_images:
        raise GatewayError(413, "too_many_images", f"{len(items)} images in one request; the limit is {max_images}")
    return items


def _json_body() -> dict:
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # the JSON parser recurses per nesting level; silent=True does not cover it
        raise GatewayError(400, "invalid_request", "the JSON body is nested too deeply") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "invalid_request", _HOW)
    if unknown := sorted(set(body) - _FIELDS):
        raise GatewayError(400, "invalid_request", f"unknown field(s) {unknown}; use url, urls, image or images")
    return body


def _images_in_json(body: dict) -> list[tuple[str, object]]:
    items = []
    if "url" in body:
        items.append(("url", _url(body["url"], "url")))
    if "image" in body:
        items.append(("bytes", _b64_image(body["image"], "image")))
    for name, kind, parse in (("urls", "url", _url), ("images", "bytes", _b64_image)):
        if name in body:
            if not isinstance(body[name], list):
                raise GatewayError(400, "invalid_request", f"{name} must be a list")
            items.extend((kind, parse(value, f"{name}[{i}]")) for i, value in enumerate(body[name]))
    return items


def _b64_image(value, where: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise GatewayError(400, "invalid_request", f"{where} must be a non-empty base64 string")
    if value.startswith("data:"):
        _, comma, value = value.partition(",")
        if not comma:
            raise GatewayError(400, "invalid_request", f"{where} is a data URL without the ',' before its base64 data")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise GatewayError(400, "invalid_request", f"{where} is not valid base64") from None


def _url(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise GatewayError(400, "invalid_request", f"{where} must be a non-empty string (an http or https URL)")
    return value
