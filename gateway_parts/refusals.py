"""How a shed request is answered: 503 overloaded with Retry-After, at once while refusals come at most
FAST_REFUSALS_PER_SECOND per process, and past that rate when the request's budget is spent.

A client that asks again as soon as it is refused would otherwise loop on instant refusals, and that loop takes
the CPU the served requests need. Holding every refusal would stop the loop too, but a held answer costs more
than one sent at once (a connection open longer), which overload can least afford.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from gateway_parts.admission import Admission
from gateway_parts.asgi import json_answer
from gateway_parts.metrics import ERRORS, REQUESTS

log = logging.getLogger("gateway")

# Refusals sent at once, per process and second, after a burst of up to FAST_REFUSAL_BURST: at well under a
# millisecond of CPU each, at most about a tenth of a core.
FAST_REFUSALS_PER_SECOND = 250.0
FAST_REFUSAL_BURST = 50.0
# Refusals held until their budget is spent, per process; past that, refusals go out at once.
MAX_HELD_REFUSALS = 1024
# One log line about shed requests per this many seconds, not one per request: under overload that would flood.
LOG_EVERY = 10.0
# The counters every shed request moves, looked up once.
_SHED_ERRORS, _SHED_REQUESTS = ERRORS.labels("overloaded"), REQUESTS.labels("/predict", "503")


class Refusals:
    """The answers to the requests `admission` sheds, for a front whose settings give the budget and limits."""

    def __init__(self, admission: Admission, settings):
        self.admission, self.settings = admission, settings
        self._held = 0
        self._tokens, self._tokens_at = FAST_REFUSAL_BURST, time.perf_counter()
        self._shed, self._logged = 0, float("-inf")  # shed requests since the last log line about them

    def at_once(self) -> bool:
        """Whether a refusal may go out now: a token bucket of FAST_REFUSALS_PER_SECOND (this takes a token)."""
        now = time.perf_counter()
        self._tokens = min(FAST_REFUSAL_BURST, self._tokens + (now - self._tokens_at) * FAST_REFUSALS_PER_SECOND)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def answer(self, arrived: float, request_id: str):
        """The answer to a request shed after it arrived at `arrived`: at once, or when its budget is spent."""
        if not self.at_once() and self._held < MAX_HELD_REFUSALS:
            self._held += 1
            try:
                await asyncio.sleep(max(0.0, arrived + self.settings.queue_budget - time.perf_counter()))
            finally:
                self._held -= 1
        return self.refusal(request_id)

    def refusal(self, request_id: str):
        """A shed request's answer (503 overloaded, with Retry-After), counted and logged."""
        retry = max(1, math.ceil(self.admission.predicted_wait()))
        message = (
            f"the gateway is at capacity: this request could not start within {self.admission.wait_budget():g} s; "
            f"retry in {retry} s"
        )
        _SHED_ERRORS.inc()
        _SHED_REQUESTS.inc()
        self._log_shed()
        return json_answer(503, "overloaded", message, request_id, [(b"retry-after", str(retry).encode())])

    def _log_shed(self) -> None:
        self._shed += 1
        now = time.monotonic()
        if now - self._logged < LOG_EVERY:
            return
        count, self._shed, self._logged = self._shed, 0, now
        admission, settings = self.admission, self.settings
        log.warning(
            "overloaded: %d request(s) shed since the last line like this one: they could not start within "
            "%g s (GATEWAY_QUEUE_BUDGET=%g s; GATEWAY_MAX_INFLIGHT=%d; %d waiting now, served %s)",
            count,
            admission.wait_budget(),
            settings.queue_budget,
            settings.max_inflight,
            admission.waiting(),
            "newest first from a short queue" if admission.overloaded() else "in arrival order",
        )
