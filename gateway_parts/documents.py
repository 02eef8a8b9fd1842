"""The two documents the gateway serves as they are: the page (GET /) and the API document (GET /openapi.json).

Both are files, read once: gateway.html beside the repository's modules (in a checkout and in the image alike),
and openapi.json beside this module. The API document is written by hand and checked, not generated: a test
validates it as OpenAPI 3, another that it names exactly the app's routes, and schemathesis checks the served
gateway's answers against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import contract

PAGE_FILE = Path(contract.__file__).with_name("gateway.html")
API_FILE = Path(__file__).with_name("openapi.json")
# The page may talk to this gateway and show local images (blobs), nothing else: it loads and sends nothing
# anywhere, and no other site may frame it.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def page() -> bytes | None:
    """The page's bytes, or None where it is not installed."""
    return PAGE_FILE.read_bytes() if PAGE_FILE.is_file() else None


def api_document() -> dict:
    """The API document (OpenAPI 3)."""
    return json.loads(API_FILE.read_text())
