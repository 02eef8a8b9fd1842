"""The gateway's Prometheus metrics, one /metrics for all of gunicorn's workers.

gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before the workers import this module; prometheus_client then
keeps each worker's values in files there, and `metrics_payload` adds them up.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
REQUESTS = Counter("gateway_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
ERRORS = Counter("gateway_errors_total", "Failed requests by error code", ["code"])
IMAGES = Counter("gateway_images_total", "Images classified")
STAGE_SECONDS = Histogram(
    "gateway_stage_seconds",
    "Time per request stage (queue, fetch, preprocess, predict, total)",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
MODEL_RETRIES = Counter(
    "gateway_model_retries_total", "Model calls tried a second time, by the first try's status", ["code"]
)
MODEL_ADDRESSES = Gauge(
    "gateway_model_addresses", "Model server addresses the gateway calls (its last lookup)", multiprocess_mode="livemax"
)
INFLIGHT = Gauge("gateway_inflight_requests", "Requests being worked on", multiprocess_mode="livesum")
WAITING = Gauge("gateway_waiting_requests", "Requests waiting for a slot (admission)", multiprocess_mode="livesum")

# prometheus_client chose file-backed values at import if PROMETHEUS_MULTIPROC_DIR was set; reading them back
# must follow the same choice, made once, here.
_MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def metrics_payload() -> bytes:
    """All workers' metrics when gunicorn runs several (PROMETHEUS_MULTIPROC_DIR), else this process's."""
    if _MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()
