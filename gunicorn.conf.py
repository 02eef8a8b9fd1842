"""gunicorn settings for the gateway: `gunicorn --config gunicorn.conf.py gateway:app`.

Every knob comes from the environment so the image, compose and Kubernetes set them without rebuilding. gunicorn
runs the processes (workers, restarts, graceful stops); each worker is uvicorn (GatewayWorker below): HTTP parsed
by httptools in an asyncio event loop, where gateway_parts.front.Front admits or sheds each request before any
thread sees it, and GATEWAY_MAX_INFLIGHT threads run the Flask app.
"""

import logging
import os
import shutil
import tempfile

from uvicorn_worker import UvicornWorker

from contract import GATEWAY_PORT


class GatewayWorker(UvicornWorker):
    """uvicorn under gunicorn, with the front's own access log (the request id and the time taken) instead of
    uvicorn's, no lifespan protocol (the app needs no start-up or shutdown events), and the client's address as
    the connection gives it (no X-Forwarded-For rewriting, as gunicorn's own workers did)."""

    CONFIG_KWARGS = {
        "loop": "auto",
        "http": "httptools",
        "access_log": False,
        "lifespan": "off",
        "proxy_headers": False,
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        access = logging.getLogger("gateway.access")
        access.handlers = self.log.access_log.handlers
        access.setLevel(self.log.access_log.level)
        access.propagate = False


bind = os.environ.get("GATEWAY_BIND", f"0.0.0.0:{GATEWAY_PORT}")
workers = int(os.environ.get("GATEWAY_WORKERS", "2"))
worker_class = GatewayWorker
# A worker whose event loop is stuck this long is restarted; well above the model deadline plus a slow fetch.
timeout = int(os.environ.get("GATEWAY_WORKER_TIMEOUT", "60"))
# On SIGTERM, requests already accepted get this long to finish (Kubernetes' grace period is longer).
graceful_timeout = int(os.environ.get("GATEWAY_GRACEFUL_TIMEOUT", "25"))
keepalive = 5
# 0: workers are not restarted after a number of requests. A restart closes the worker's keep-alive connections, and
# a request already on its way over one gets no answer; under overload, when shed requests count too, restarts come
# every minute or so. Set it if memory creeps (the load tests bound the workers' memory over 1,000 uploads).
max_requests = int(os.environ.get("GATEWAY_MAX_REQUESTS", "0"))
max_requests_jitter = max_requests // 10
# "-": one line per request on stdout (the front writes it: client, request line, status, bytes, time, request id).
accesslog = os.environ.get("GATEWAY_ACCESS_LOG", "-") or None
errorlog = "-"
loglevel = os.environ.get("GATEWAY_LOG_LEVEL", "info")
# gunicorn's control socket (for `gunicornc`) goes under $HOME, which is not writable in the containers.
control_socket_disable = True
# Containers run with a read-only root filesystem: keep gunicorn's heartbeat files in memory.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108 (gunicorn heartbeat only)


_metrics_dir = []  # the directory on_starting made, removed again on exit


def on_starting(server):
    """In the master, before any worker starts: metrics shared by all workers, and the gateway's logging."""
    # One /metrics for all workers: prometheus_client's multiprocess mode keeps each worker's values in files
    # here. Set before the workers import the app; a fresh directory, so no stale values from a past run.
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        _metrics_dir.append(tempfile.mkdtemp(prefix="gateway-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir[0]
    # The gateway's own log lines (errors with their request id, the discovered signature) to stderr.
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")


def child_exit(server, worker):
    """A finished worker's live gauges (in-flight requests) stop counting towards /metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    for directory in _metrics_dir:
        shutil.rmtree(directory, ignore_errors=True)
