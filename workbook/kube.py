"""Kubernetes from a notebook: a local port forwarded to a Service while a cell needs it, and parts of the
project's manifests shown on their own."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

import yaml


@contextlib.contextmanager
def port_forward(kubectl: str, namespace: str, target: str, local: int, remote: int, timeout: float = 60):
    """`kubectl port-forward <target> local:remote` in the background until the block ends, as the course runs it
    in a second terminal. Waits until the local port accepts connections."""
    command = [kubectl, "port-forward", "-n", namespace, target, f"{local}:{remote}"]
    print("$", " ".join(command), "&", flush=True)
    forward = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local), timeout=1):
                break
            if forward.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kubectl port-forward {target} did not start: {forward.stderr.read()}")
            time.sleep(0.3)
        yield f"localhost:{local}"
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def excerpt(path: Path, kind: str, name: str, *keys: str) -> str:
    """The YAML of one object's field in a manifest file: `excerpt(base / "model.yaml", "Deployment",
    "clothing-model", "spec", "strategy")`. A key that is a number picks that item of a list."""
    document = next(
        d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == kind and d["metadata"]["name"] == name
    )
    value = document
    for key in keys:
        value = value[int(key)] if key.isdigit() else value[key]
    return yaml.safe_dump({keys[-1]: value} if keys else value, sort_keys=False).rstrip()


def container(path: Path, name: str, *keys: str) -> str:
    """One field of a Deployment's first container, as excerpt shows it."""
    return excerpt(path, "Deployment", name, "spec", "template", "spec", "containers", "0", *keys)
