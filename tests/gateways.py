"""Run the gateway under gunicorn for a test, exactly as production runs it, and always stop it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from servers import free_port, terminate

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunningGateway:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_gateway(
    tf_serving_host: str,
    log_dir: Path,
    *,
    workers: int = 1,
    startup_timeout: float = 90,
    app: str = "gateway:app",
    pythonpath: str | None = None,
    gunicorn_args: tuple[str, ...] = (),
    **env: str,
):
    """gunicorn --config gunicorn.conf.py `app` on a free port; yields once /healthz answers.

    `app`, `pythonpath` and `gunicorn_args` serve another app with the same settings otherwise (the benchmark's
    course gateway, a WSGI app: `gunicorn_args=("--worker-class", "gthread", "--threads", "8")`)."""
    port = free_port()
    environment = {
        **os.environ,
        "TF_SERVING_HOST": tf_serving_host,
        "GATEWAY_BIND": f"127.0.0.1:{port}",
        "GATEWAY_WORKERS": str(workers),
        "GATEWAY_ACCESS_LOG": "-",
        **env,
    }
    log_path = Path(log_dir) / f"gateway-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"),
                *(("--pythonpath", pythonpath) if pythonpath else ()),
                *gunicorn_args,
                app,
            ],
            cwd=ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    gateway = RunningGateway(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {process.returncode}:\n{gateway.log()}")
            with contextlib.suppress(requests.ConnectionError, requests.Timeout):  # workers may still be importing
                if requests.get(f"{gateway.url}/healthz", timeout=1).ok:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not answer /healthz in {startup_timeout:.0f} s:\n{gateway.log()}")
            time.sleep(0.1)
        yield gateway
    finally:
        terminate(process)
