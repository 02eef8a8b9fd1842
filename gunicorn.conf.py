"""gunicorn settings for the gateway: `gunicorn --config gunicorn.conf.py gateway:app`.

Every knob comes from the environment so the image, compose and Kubernetes set them without
rebuilding. The gateway mostly waits on the model tier (gRPC releases the GIL), so a few threaded
workers serve it; the app itself admits GATEWAY_MAX_INFLIGHT requests at once per worker and sheds what
cannot start within GATEWAY_QUEUE_BUDGET (see gateway.py).
"""

import os
import shutil
import tempfile

from contract import GATEWAY_PORT

bind = os.environ.get("GATEWAY_BIND", f"0.0.0.0:{GATEWAY_PORT}")
workers = int(os.environ.get("GATEWAY_WORKERS", "2"))
worker_class = "gthread"
# Threads only wait for the most part: a request waiting for an admission slot (gateway.py) holds one. Enough of
# them that every request reaches the admission queue, where its wait counts against GATEWAY_QUEUE_BUDGET; a
# request left in gunicorn's own queue would wait unseen.
threads = int(os.environ.get("GATEWAY_THREADS", "64"))
# The app sizes its admission with it (Settings.threads): the value gunicorn really uses.
os.environ["GATEWAY_THREADS"] = str(threads)
# A worker silent this long is restarted; well above the model deadline plus a slow fetch.
timeout = int(os.environ.get("GATEWAY_WORKER_TIMEOUT", "60"))
# On SIGTERM, requests already accepted get this long to finish (Kubernetes' grace period is longer).
graceful_timeout = int(os.environ.get("GATEWAY_GRACEFUL_TIMEOUT", "25"))
keepalive = 5
# Fresh workers now and then keep memory from creeping; jitter avoids restarting all at once.
max_requests = int(os.environ.get("GATEWAY_MAX_REQUESTS", "20000"))
max_requests_jitter = max_requests // 10
accesslog = os.environ.get("GATEWAY_ACCESS_LOG", "-")
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}o)s'
errorlog = "-"
loglevel = os.environ.get("GATEWAY_LOG_LEVEL", "info")
# gunicorn's control socket (for `gunicornc`) goes under $HOME, which is not writable in the containers.
control_socket_disable = True
# Containers run with a read-only root filesystem: keep gunicorn's heartbeat files in memory.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108 (gunicorn heartbeat only)


_metrics_dir = []  # the directory on_starting made, removed again on exit


def on_starting(server):
    """In the master, before any worker starts: metrics shared by all workers, and the gateway's logging."""
    import logging

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
