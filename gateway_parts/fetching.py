"""A request's URLs, fetched at the same time within one deadline, each under safe_fetch's rules."""

from __future__ import annotations

import time
from concurrent import futures

from gateway_parts.errors import GatewayError
from safe_fetch import FetchError, FetchPolicy, fetch_image

# Threads shared by the process's requests; a request with one URL fetches it in its own thread.
_FETCHERS = futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="fetch")


def fetch_all(items, policy: FetchPolicy) -> list[bytes]:
    """The request's images as bytes, in order: ("bytes", data) as they are, ("url", url) fetched. The URLs are
    fetched in parallel within one deadline for all of them (the policy's total timeout); the first failure, in
    request order, is the answer."""
    urls = [value for kind, value in items if kind == "url"]
    deadline = time.monotonic() + policy.total_timeout
    if len(urls) == 1:
        jobs = [_fetch_now(urls[0], policy, deadline)]
    else:
        jobs = [_FETCHERS.submit(fetch_image, url, policy, deadline=deadline) for url in urls]
    fetched = iter(jobs)
    payloads = []
    for kind, value in items:
        if kind != "url":
            payloads.append(value)
            continue
        try:
            payloads.append(next(fetched).result().data)
        except FetchError as error:
            raise GatewayError(error.status, error.code, str(error)) from None
    return payloads


def _fetch_now(url: str, policy: FetchPolicy, deadline: float) -> futures.Future:
    """One URL needs no other thread: fetched here, as a finished future."""
    job = futures.Future()
    try:
        job.set_result(fetch_image(url, policy, deadline=deadline))
    except FetchError as error:
        job.set_exception(error)
    return job
